"""Checks that need the whole stack: each problem is one line that starts with its stack key."""

from __future__ import annotations

from components.accelerators import PROFILES
from components.placement import PlacementError, place
from components.plan import LayoutError, demands, replica_ports, resolve_layout, server_port, server_port_key
from components.schema import QUANTIZATION_ALIASES, Model, Node, StackConfig
from components.specs import managed_env


def _node_problems(config: StackConfig) -> list[str]:
    problems: list[str] = []
    if config.local_docker and config.workers:
        problems.append("localDocker: true runs every container on this machine's one Docker engine, where the "
                        "workers' Ray containers would take each other's place; remove workers or set localDocker: false")
    addresses: dict[str, str] = {config.head.address: "head"}
    labels: dict[str, str] = {config.head.label: "head"}
    for i, worker in enumerate(config.workers):
        key = f"workers[{i}]"
        if worker.address in addresses:
            other = addresses[worker.address]
            fix = "a worker cannot be the head" if other == "head" else "list each machine once"
            problems.append(f"{key}.address: {worker.address} is also {other}'s address; {fix}")
        addresses.setdefault(worker.address, key)
        if worker.label in labels:
            problems.append(f"{key}.name: {worker.label!r} is also {labels[worker.label]}'s name; give each node its own name")
        labels.setdefault(worker.label, key)

    profile = PROFILES[config.accelerator]
    cluster_addresses: dict[str, str] = {}
    for key, node in _keyed_nodes(config):
        if problem := profile.gpu_count_problem(node.gpus):
            problems.append(f"{key}.gpus: {problem}")
        cluster_address = node.cluster_address or node.address
        if (other := cluster_addresses.setdefault(cluster_address, key)) != key:
            problems.append(f"{key}.clusterAddress: {cluster_address} is also {other}'s cluster address; "
                            "give each node its own address on the cluster network")
    return problems


def _keyed_nodes(config: StackConfig) -> list[tuple[str, Node]]:
    return [("head", config.head)] + [(f"workers[{i}]", w) for i, w in enumerate(config.workers)]


def _vendor_setting_problems(config: StackConfig) -> list[str]:
    """extraEnv may not set what the program sets from other keys (it would silently fight them)."""
    managed = managed_env(PROFILES[config.accelerator])
    problems = []
    for key, env in [("extraEnv", config.extra_env)] + [(f"{k}.extraEnv", n.extra_env) for k, n in _keyed_nodes(config)]:
        for name in sorted(env):
            if name in managed:
                problems.append(f"{key}.{name}: the program sets it from {managed[name]}; remove it from {key}")
    return problems


def _quantization_problem(config: StackConfig, key: str, model: Model) -> str | None:
    profile = PROFILES[config.accelerator]
    if model.quantization in QUANTIZATION_ALIASES + profile.quantization_methods:
        return None
    return (f"{key}.quantization: {model.quantization!r} is not served on the {profile.name} profile; use one of "
            f"{', '.join(QUANTIZATION_ALIASES + profile.quantization_methods)}")


def _model_problems(config: StackConfig) -> list[str]:
    problems: list[str] = []
    reserved = {config.api_port: "apiPort", config.cluster_check_port: "clusterCheckPort"}
    served: dict[str, str] = {}
    directories: dict[str, Model] = {}
    profile = PROFILES[config.accelerator]
    gpus = [node.gpus for node in config.nodes]
    for i, model in enumerate(config.models):
        key = f"models[{i}]"
        if model.name in served:
            problems.append(f"{key}.servedName: {model.name!r} is also {served[model.name]}'s served name; set a distinct servedName")
        served.setdefault(model.name, key)
        first = directories.setdefault(model.directory, model)
        if (first.source, first.id, first.revision, first.local_path) != (model.source, model.id, model.revision, model.local_path):
            problems.append(
                f"{key}: it would use the directory {model.directory!r} under modelRoot, like another model "
                "with a different source or revision; serve one revision per directory"
            )
        port, port_key = server_port(config, i), server_port_key(config, i)
        if port in reserved:
            problems.append(f"{port_key}: {port} collides with {reserved[port]}; give this model another port")
        elif clash := config.ray_ports.collision(port):
            problems.append(f"{port_key}: {port} collides with {clash}; give this model another port")
        reserved.setdefault(port, key)
        if problem := _quantization_problem(config, key, model):
            problems.append(problem)
        try:
            resolve_layout(model, profile=profile, gpus=gpus)
        except LayoutError as error:
            problems.append(f"{key}.{error}")
    return problems


def _placement_problems(config: StackConfig) -> list[str]:
    """Replicas against the devices: they fit, at most one spans nodes, ports stay unique on every node."""
    profile = PROFILES[config.accelerator]
    wanted = demands(config, profile)
    spanning = [d for d in wanted if d.spans_nodes]
    if sum(d.replicas or 1 for d in spanning) > 1:
        return [f"{spanning[-1].key}.replicas: only one replica in the stack may span nodes (Ray would place the "
                "pipeline stages of two on whichever nodes are free); give the others a layout that fits one node"]
    for demand in wanted:
        if demand.spare and (demand.replicas != 1 or demand.spans_nodes):
            why = "several replicas roll one at a time anyway" if demand.replicas != 1 else \
                "a replica spanning nodes has no spare node to start beside"
            return [f"{demand.key}.updateStrategy: blueGreen keeps a second copy of one replica that fits one node "
                    f"ready; {why}: remove updateStrategy or set replicas: 1 and a layout that fits one node"]
    filling = [d for d in wanted if d.replicas == 0 and profile.has_gpus]
    if len(filling) > 1:
        return [f"{filling[1].key}.replicas: 0 (as many as fit) — only one model can take the devices left, "
                f"and {filling[0].key} already does; give this one a number of replicas"]
    try:
        slots = place([node.gpus for node in config.nodes], wanted)
    except PlacementError as error:
        return [str(error)]
    problems = []
    seen: dict[tuple[int, int], str] = {}
    for model_ports in replica_ports(config, slots):
        for node, port, key in model_ports:
            other = seen.setdefault((node, port), key)
            if other != key:
                problems.append(f"{key}: port {port} on {config.nodes[node].label} is also {other}'s (replicas sharing "
                                "a node take port + 100, + 200, ...); give this model another port")
    return problems


def stack_problems(config: StackConfig) -> list[str]:
    """Every whole-stack problem, each naming its key (without the project prefix)."""
    problems = _node_problems(config) + _vendor_setting_problems(config)
    if clash := config.ray_ports.collision(config.api_port):
        problems.append(f"apiPort: {config.api_port} collides with {clash}; pick another port, e.g. 8000")
    check_port = config.cluster_check_port
    if clash := config.ray_ports.collision(check_port) or ("apiPort" if check_port == config.api_port else None):
        problems.append(f"clusterCheckPort: {check_port} collides with {clash}; pick another port, e.g. 29555")
    if config.model_root == config.data_root:
        problems.append("dataRoot: must differ from modelRoot; model files and Ray's state live apart")
    problems += _model_problems(config)
    served = [model.name for model in config.models]
    for i, key in enumerate(config.api_keys):
        if unknown := [name for name in key.models or [] if name not in served]:
            problems.append(f"apiKeys[{i}].models: {', '.join(unknown)} not served here; use servedName values: {', '.join(served)}")
    # Placement needs valid nodes and layouts to say anything useful.
    return problems or _placement_problems(config)


def stack_warnings(config: StackConfig) -> list[str]:
    """What is allowed but likely wrong, each starting with its key."""
    profile = PROFILES[config.accelerator]
    if config.mount_dtk and profile.toolkit_mount_warning:
        return [f"mountDtk: {profile.toolkit_mount_warning}"]
    return []
