"""Plain functions that build what the node containers run: Ray command lines, env, mounts, options,
and the JSON specs the runtime reads (docs/runtime-contract.md). Pure: no Pulumi import.

Every container of a node (Ray head or worker, model server, gateway) shares one base spec so a
node's devices, address and interfaces cannot drift between them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from components.accelerators import Profile
from components.plan import ModelPlan, NodePlan, Plan, ReplicaPlan
from components.preflight import HostFacts
from components.schema import shm_size_mb

RESTART_POLICY = "unless-stopped"
SERVER_ENTRY = ("node-runtime", "serve")
GATEWAY_ENTRY = ("node-runtime", "gateway")
SERVE_SPEC_ENV = "NODE_RUNTIME_SERVE_SPEC"
GATEWAY_CONFIG_ENV = "NODE_RUNTIME_GATEWAY_CONFIG"
API_KEY_ENV = "NODE_RUNTIME_API_KEY"
# The named keys' values, name -> value as JSON; their models and limits are in the gateway's config.
API_KEYS_ENV = "NODE_RUNTIME_API_KEYS"
# The key every replica requires (vLLM reads VLLM_API_KEY) and the gateway sends: replicas off the
# head listen on the cluster network.
INTERNAL_KEY_ENV = "NODE_RUNTIME_INTERNAL_KEY"
REPLICA_KEY_ENV = "VLLM_API_KEY"
# The variable each collective library takes its interface from. vLLM's Ray executor does not forward
# GLOO_* to its workers: both must be on every node container before `ray start`.
INTERFACE_ENV = {"nccl": "NCCL_SOCKET_IFNAME", "gloo": "GLOO_SOCKET_IFNAME"}
# What the program sets on node containers, with the stack key to change instead: extraEnv may not set
# these. Device visibility is the plan's (each container sees the devices it owns), never the user's.
MANAGED_ENV = {
    "VLLM_HOST_IP": "the node's clusterAddress",
    "RAY_NODE_IP_ADDRESS": "the node's clusterAddress",
    "RAY_OVERRIDE_NODE_IP_ADDRESS": "the node's clusterAddress",
    "HF_HUB_OFFLINE": "the model store (every model is on disk before a server starts)",
    INTERFACE_ENV["nccl"]: "ncclSocketIfname or the node's interface",
    INTERFACE_ENV["gloo"]: "glooSocketIfname or the node's interface",
    "HIP_VISIBLE_DEVICES": "the placement plan (each container sees the devices it owns)",
    "CUDA_VISIBLE_DEVICES": "the placement plan (each container sees the devices it owns)",
    "ROCR_VISIBLE_DEVICES": "the placement plan (each container sees the devices it owns)",
    SERVE_SPEC_ENV: "the model's keys",
    REPLICA_KEY_ENV: "the internal key made on the head",
}


def managed_env(profile: Profile) -> dict[str, str]:
    """Every variable the program sets on this profile's node containers, with what sets it."""
    found = dict(MANAGED_ENV)
    found.update({name: f"the {profile.name} profile" for name in profile.extra_env})
    if profile.toolkit_env_var:
        found[profile.toolkit_env_var] = "mountDtk"
    return found


@dataclass(frozen=True)
class ContainerSpec:
    """docker.Container keyword arguments that do not depend on other resources."""

    name: str
    command: list[str]
    envs: dict[str, str]
    devices: list[str]
    group_adds: list[str]
    capabilities: list[str]
    security_opts: list[str]
    bind_mounts: list[tuple[str, bool]]  # (path, read_only): same path on host and in container
    shm_size_mb: int
    # Devices the container gets only on a host that has them (HostFacts.devices).
    optional_devices: list[str] = field(default_factory=list)
    # Variables whose value is the interface holding the node's cluster address (HostFacts.interface).
    interface_env: list[str] = field(default_factory=list)
    ulimits: list[tuple[str, int, int]] = field(default_factory=list)  # (name, soft, hard); -1 = unlimited
    privileged: bool = False
    network_mode: str = "host"
    ipc_mode: str = "host"
    # A Ray driver in a sibling container of its node's Ray (a server using Ray's executor, the gateway's
    # cluster probe) shares the host's PID namespace, which keeps Ray's process bookkeeping consistent.
    pid_mode: str | None = "host"
    # With a PID namespace of its own, an init as PID 1: when the main process dies, the kernel ends every
    # other process of the container with it (no engine process left holding memory or devices).
    init: bool = False
    restart: str = RESTART_POLICY

    @property
    def depends_on_host(self) -> bool:
        return bool(self.optional_devices or self.interface_env)

    def on_host(self, facts: HostFacts) -> ContainerSpec:
        """The spec for one host: its optional devices where present, its interface where derived."""
        envs = dict(self.envs)
        if facts.interface:
            envs.update({name: facts.interface for name in self.interface_env})
        devices = self.devices + [d for d in self.optional_devices if d in facts.devices]
        return replace(self, envs=envs, devices=devices, optional_devices=[], interface_env=[])


def node_env(plan: Plan, node: NodePlan, devices: tuple[int, ...]) -> dict[str, str]:
    """What Ray, vLLM and the collective libraries must agree on before `ray start`: the user's extraEnv
    (checked not to name a variable set here, components/checks.py), then the program's own."""
    env = dict(node.extra_env)
    # One data-plane address for Ray and vLLM, or placement groups never schedule; the Ray variables as
    # vLLM's examples/online_serving/run_cluster.sh sets them for multi-NIC hosts.
    for name in ("VLLM_HOST_IP", "RAY_NODE_IP_ADDRESS", "RAY_OVERRIDE_NODE_IP_ADDRESS"):
        env[name] = node.cluster_address
    env["HF_HUB_OFFLINE"] = "1"
    env.update({INTERFACE_ENV[i.kind]: i.name for i in node.interfaces if i.name})
    env.update(plan.profile.node_env(devices, mount_dtk=plan.config.mount_dtk))
    return env


def node_container_spec(plan: Plan, node: NodePlan, role: str, command: list[str],
                        devices: tuple[int, ...]) -> ContainerSpec:
    """The base of every container on a node that sees `devices` of it."""
    config, profile = plan.config, plan.profile
    mounts = [(config.model_root, False), (plan.ray_temp_dir, False)]
    mounts += [(mount.path, True) for mount in profile.mounts(mount_dtk=config.mount_dtk)]
    return ContainerSpec(
        name=plan.container_name(role),
        command=command,
        envs=node_env(plan, node, devices),
        devices=[device.path for device in profile.devices] + list(config.extra_devices),
        group_adds=list(profile.group_adds),
        capabilities=list(profile.capabilities),
        security_opts=list(profile.security_opts),
        bind_mounts=mounts,
        shm_size_mb=shm_size_mb(config.shm_size),
        optional_devices=list(profile.optional_devices),
        interface_env=[INTERFACE_ENV[i.kind] for i in node.interfaces if i.derived],
        ulimits=[(name, soft, hard) for name, (soft, hard) in sorted(config.ulimits.items())],
        privileged=config.privileged,
    )


def ray_start_command(plan: Plan, node: NodePlan) -> list[str]:
    """`ray start --block` for the head or a worker joining it."""
    ports = plan.config.ray_ports
    common = [
        f"--node-ip-address={node.cluster_address}",
        f"--num-gpus={len(node.ray_devices)}",
        f"--object-manager-port={ports.object_manager}",
        f"--node-manager-port={ports.node_manager}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--metrics-export-port={ports.metrics_export}",
        # Random unless pinned: every port a firewall has to allow is one of rayPorts.
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        "--disable-usage-stats",
        "--block",
    ]
    if node.role == "head":
        role = [
            "--head",
            f"--port={ports.gcs}",
            f"--temp-dir={plan.ray_temp_dir}",
            # The dashboard's Jobs API runs code unauthenticated (CVE-2023-48022): the cluster network only.
            f"--dashboard-host={node.cluster_address}",
            f"--dashboard-port={ports.dashboard}",
            f"--ray-client-server-port={ports.client_server}",
        ]
    else:
        # Ray takes the temp dir from the head; workers keep theirs under the same dataRoot path.
        role = [f"--address={plan.cluster.ray_address}"]
    return ["ray", "start", *role, *common]


def cluster_json(plan: Plan) -> dict[str, Any]:
    """The `cluster` part of the serve spec and the gateway config."""
    cluster = plan.cluster
    return {
        "ray_address": cluster.ray_address,
        "expected_nodes": cluster.expected_nodes,
        "expected_gpus": cluster.expected_gpus,
        "timeout_s": cluster.timeout_s,
    }


def serve_spec(plan: Plan, model: ModelPlan, replica: ReplicaPlan) -> dict[str, Any]:
    """The launcher's NODE_RUNTIME_SERVE_SPEC for one replica (docs/runtime-contract.md): the concrete
    layout, which the launcher checks rather than working it out again; the Ray cluster it waits for
    only when it runs on Ray."""
    config = model.model
    return {
        "served_model_name": model.name,
        "model_path": plan.model_path(config),
        "host": replica.host,
        "port": replica.port,
        "accelerator": plan.profile.name,
        "tensor_parallel_size": model.layout.tensor_parallel_size,
        "pipeline_parallel_size": model.layout.pipeline_parallel_size,
        "distributed_executor_backend": replica.executor,
        "quantization": config.quantization,
        "dtype": config.dtype,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": config.max_model_len,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "extra_args": list(config.extra_args),
        "cluster": cluster_json(plan) if replica.executor == "ray" else None,
        **({"slots": [{"devices": list(devices), "port": port} for devices, port in replica.slots],
            "slot_lock_dir": plan.slot_lock_dir} if replica.spare else {}),
    }


def server_container_spec(plan: Plan, model: ModelPlan, replica: ReplicaPlan) -> ContainerSpec:
    """The home node's base spec, seeing the replica's devices only, running the launcher with its serve spec.

    A replica on Ray's executor is a Ray driver beside its node's Ray; any other has a PID namespace
    of its own, so no engine process outlives its server."""
    on_ray = replica.executor == "ray"
    # A blue-green replica sees both its slots' devices; its launcher keeps those of the slot it takes.
    devices = tuple(sorted({device for slot_devices, _ in replica.slots for device in slot_devices}))
    spec = node_container_spec(plan, replica.home, f"server-{model.name}-{replica.index}", list(SERVER_ENTRY), devices)
    spec.envs[SERVE_SPEC_ENV] = to_env_json(serve_spec(plan, model, replica))
    if on_ray:
        return spec
    mounts = [m for m in spec.bind_mounts if m[0] != plan.ray_temp_dir]
    if replica.spare:
        mounts.append((plan.slot_lock_dir, False))
    return replace(spec, pid_mode=None, init=True, bind_mounts=mounts)


def generation(spec: ContainerSpec, image_tag: str) -> str:
    """A short name for everything a copy runs with: a blue-green copy's names change with its
    settings or its image, so a change starts a new copy beside the running one."""
    return hashlib.sha256((json.dumps(asdict(spec), sort_keys=True) + image_tag).encode()).hexdigest()[:8]


def gateway_config(plan: Plan) -> dict[str, Any]:
    """The gateway's NODE_RUNTIME_GATEWAY_CONFIG (docs/runtime-contract.md). Static: the replicas reach
    the gateway through route files (components/model_server.py), so a replica change never restarts it."""
    config = plan.config
    # Only when a model asks: a stack that does not keeps the gateway's config, and its container, as they were.
    speed_aware = [model.name for model in plan.models if model.model.balancing == "speedAware"]
    return {
        **({"speed_aware_models": speed_aware} if speed_aware else {}),
        "host": config.api_bind_address,
        "port": config.api_port,
        "workers": config.gateway_workers,
        "models": [model.name for model in plan.models],
        "routes_dir": plan.routes_dir,
        "cluster": cluster_json(plan),
        "max_batch_size": config.max_batch_size,
        "max_n": config.max_n,
        "max_batch_tokens": config.max_batch_tokens,
        "request_timeout_s": config.timeouts.request,
        "max_body_bytes": config.max_request_body_mb * 2**20,
        "max_header_bytes": config.max_header_kb * 2**10,
        "body_read_timeout_s": config.timeouts.body_read,
        "access_log_percent": config.access_log_percent,
        "api_keys": [{"name": key.name, "models": key.models, "requests_per_minute": key.requests_per_minute,
                      "tokens_per_minute": key.tokens_per_minute} for key in config.api_keys],
    }


def api_key_values(api_keys: str) -> str:
    """NODE_RUNTIME_API_KEYS from the apiKeys secret (its JSON list): name -> value, nothing else."""
    return json.dumps({entry["name"]: entry["key"] for entry in json.loads(api_keys)}, separators=(",", ":"))


def gateway_container_spec(plan: Plan) -> ContainerSpec:
    """No devices, no model files: HTTP on the host network, the route files read-only. Its cluster
    health check is a Ray driver on the head node, so like a server on Ray it shares the head's Ray
    session directory, IPC and PID namespaces."""
    return ContainerSpec(
        name=plan.container_name("gateway"),
        command=list(GATEWAY_ENTRY),
        envs={GATEWAY_CONFIG_ENV: to_env_json(gateway_config(plan))},
        devices=[],
        group_adds=[],
        capabilities=[],
        security_opts=[],
        bind_mounts=[(plan.ray_temp_dir, False), (plan.routes_dir, True)],
        shm_size_mb=64,
    )


def to_env_json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
