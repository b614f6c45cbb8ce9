"""Everything derived from the stack config, worked out once.

`make_plan(config)` turns a validated StackConfig into the plan the components read: per node its
ssh target, address, devices and the ports its preflight checks; per model its directory, path,
port, concrete TP x PP layout and executor; the cluster's names, paths and addresses. Nothing else
computes these: components and the runtime's specs take them from here. Pure: no Pulumi import.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

from components.accelerators import PROFILES, Profile
from components.placement import PORT_STRIDE, Demand, Slot, place
from components.schema import Model, Node, StackConfig

Role = Literal["head", "worker"]


class LayoutError(ValueError):
    """A model's TP x PP does not fit the cluster; the message starts with the key to change."""


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"ssh://{self}"


@dataclass(frozen=True)
class Layout:
    tensor_parallel_size: int
    pipeline_parallel_size: int

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def resolve_layout(model: Model, *, profile: Profile, gpus: list[int]) -> Layout:
    """The concrete (TP, PP) of one replica of `model` on nodes with `gpus` devices each.

    0 = auto. One replica: every device of the cluster, TP = the devices of one node and PP = the
    nodes (vLLM's multi-node advice). Several replicas (or 0 = as many as fit): one whole node each.
    A pinned TP keeps PP 1 unless PP is pinned too, so a model given a TP of its own leaves the other
    devices to other replicas and models.
    """
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    if profile.single_process_reason:
        if tp > 1 or pp > 1:
            raise LayoutError(
                f"tensorParallelSize/pipelineParallelSize: {profile.single_process_reason}; set both to 0 or 1"
            )
        return Layout(1, 1)
    if tp == 0:
        if len(set(gpus)) > 1:
            raise LayoutError(
                f"tensorParallelSize: 0 (a whole node per TP group) needs the same GPU count on every node, "
                f"found {gpus}; set tensorParallelSize and pipelineParallelSize explicitly"
            )
        tp, pp = gpus[0], pp or (len(gpus) if model.replicas == 1 else 1)
    layout = Layout(tp, pp or 1)
    world, total, smallest = layout.world_size, sum(gpus), min(gpus)
    if world > total:
        raise LayoutError(
            f"tensorParallelSize: {tp} x pipelineParallelSize {layout.pipeline_parallel_size} = {world} GPUs, "
            f"but the cluster has {total}; lower them or add workers"
        )
    if world <= max(gpus):
        if not any(count % world == 0 for count in gpus if count >= world):
            raise LayoutError(
                f"tensorParallelSize: {tp} x pipelineParallelSize {layout.pipeline_parallel_size} = {world} devices "
                f"splits every node unevenly ({', '.join(map(str, sorted(set(gpus))))} devices); use a divisor of a node's count"
            )
        return layout
    if len(set(gpus)) > 1:
        raise LayoutError(
            f"tensorParallelSize: {tp} x pipelineParallelSize {layout.pipeline_parallel_size} = {world} GPUs spans "
            f"nodes, which needs the same GPU count on every node (found {gpus}); use a layout that fits one node"
        )
    if tp > smallest and tp % smallest:
        raise LayoutError(
            f"tensorParallelSize: {tp} does not fill whole nodes of {smallest} GPUs; "
            f"use a divisor of {smallest} or a multiple of it"
        )
    if world % smallest:
        raise LayoutError(
            f"pipelineParallelSize: {tp} x {layout.pipeline_parallel_size} = {world} GPUs spans nodes without "
            f"filling them ({smallest} per node); make tensorParallelSize x pipelineParallelSize a multiple of it"
        )
    return layout


def server_port(config: StackConfig, index: int) -> int:
    """The private port of models[index]'s first replica on a node: its own `port`, else serverPortBase + index."""
    return config.models[index].port or config.server_port_base + index


def server_port_key(config: StackConfig, index: int) -> str:
    """The stack key an operator changes to move models[index]'s port."""
    return f"models[{index}].port" if config.models[index].port else f"serverPortBase (+{index} for models[{index}])"


@dataclass(frozen=True)
class Interface:
    """The interface one collective library (nccl: NCCL/RCCL, gloo: Gloo) uses on a node."""

    kind: Literal["nccl", "gloo"]
    # The node's `interface`, else the stack's; None = not configured.
    name: str | None
    # The stack key that sets it.
    key: str
    # Not configured, with workers: the interface holding the node's cluster address there, as the host's
    # facts report it (components/preflight.py) — left to the library, Gloo would bind to loopback.
    derived: bool


@dataclass(frozen=True)
class NodePlan:
    # "head" or "workers[i]": where it is in the stack file.
    key: str
    label: str
    role: Role
    # The address the operator reaches it on (ssh, Docker over ssh); `cluster_address` is the one Ray,
    # vLLM, NCCL and Gloo use between the nodes (the same unless the node sets clusterAddress).
    address: str
    cluster_address: str
    gpus: int
    ssh: SshTarget
    # The container running Ray there: the preflight leaves ports alone that this stack's own Ray holds.
    ray_container: str
    # (port, stack key) the preflight requires free before anything runs there.
    ports: tuple[tuple[int, str], ...]
    # The interfaces NCCL/RCCL and Gloo use there.
    interfaces: tuple[Interface, ...]
    # The devices Ray owns there: those of the replicas that span nodes, and no other.
    ray_devices: tuple[int, ...]
    # The stack's extraEnv with the node's own over it: (name, value), sorted.
    extra_env: tuple[tuple[str, str], ...]

    @property
    def nccl_interface(self) -> str | None:
        return next(i.name for i in self.interfaces if i.kind == "nccl")

    @property
    def gloo_interface(self) -> str | None:
        return next(i.name for i in self.interfaces if i.kind == "gloo")

    @property
    def where(self) -> str:
        """How messages about this node name it."""
        also = f", cluster address {self.cluster_address}" if self.cluster_address != self.address else ""
        return f"{self.label} ({self.address}{also})"


@dataclass(frozen=True)
class ReplicaPlan:
    index: int
    home: NodePlan
    # Every node it runs on, home first (one unless it spans nodes through Ray).
    nodes: tuple[str, ...]
    # The devices it uses on each of its nodes.
    devices: tuple[int, ...]
    port: int
    # Where it listens: loopback on the head, the node's cluster address elsewhere (behind the internal key).
    host: str
    executor: str | None
    container: str
    id: str  # the gateway's name for it: "<served name>/<index>"
    # blueGreen: the spare (devices, port) on the same node. A new copy takes whichever of the two
    # the running one does not hold (the launcher decides, by lock), and is switched to once healthy.
    spare: tuple[tuple[int, ...], int] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def slots(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        """(devices, port) it may run on: its own, and its spare when it has one."""
        return ((self.devices, self.port),) + ((self.spare,) if self.spare else ())


@dataclass(frozen=True)
class ModelPlan:
    """One model of the stack: its index in `models`, its layout per replica, and where each replica runs."""

    index: int
    model: Model
    layout: Layout
    replicas: tuple[ReplicaPlan, ...]

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def directory(self) -> str:
        return self.model.directory


@dataclass(frozen=True)
class FabricCheck:
    """What `cluster check` runs once Ray is ready: on which head port, for how long, and whether with NCCL/RCCL.
    Only a cluster of several nodes has a fabric to check (and a single node's Ray may advertise another
    address than a loopback head address: Ray resolves 127.0.0.1 to the host's own)."""

    port: int
    timeout_s: int
    # NCCL/RCCL across the nodes whose Ray owns GPUs (the DCU profile); Gloo alone otherwise.
    nccl: bool


@dataclass(frozen=True)
class ClusterReadiness:
    """What `cluster wait` and the gateway's /health expect of Ray."""

    ray_address: str
    expected_nodes: int
    expected_gpus: int
    timeout_s: int


@dataclass(frozen=True)
class Plan:
    config: StackConfig
    profile: Profile
    head: NodePlan
    workers: tuple[NodePlan, ...]
    models: tuple[ModelPlan, ...]
    cluster: ClusterReadiness
    fabric: FabricCheck | None

    @property
    def nodes(self) -> tuple[NodePlan, ...]:
        return (self.head, *self.workers)

    def container_name(self, role: str) -> str:
        return f"{self.config.cluster_name}-{role}"

    @property
    def ray_temp_dir(self) -> str:
        """Ray's session dir on every host, shared by the Ray, server and gateway containers there."""
        return f"{self.config.data_root}/ray"

    @property
    def relay_key_path(self) -> str:
        """The head's key for model and image distribution; it never leaves the head."""
        return f"{self.config.data_root}/ssh/relay_ed25519"

    @property
    def gateway_dir(self) -> str:
        """The gateway's state on the head: its route files and the replicas' internal key."""
        return f"{self.config.data_root}/gateway"

    @property
    def slot_lock_dir(self) -> str:
        """On every host: which blue-green slot each running copy holds (a lock per slot)."""
        return f"{self.config.data_root}/slots"

    @property
    def routes_dir(self) -> str:
        return f"{self.gateway_dir}/routes"

    @property
    def internal_key_path(self) -> str:
        return f"{self.gateway_dir}/internal_key"

    @property
    def gateway_metrics_url(self) -> str:
        """The gateway's /metrics as seen on the head itself (drains read it there)."""
        bind = self.config.api_bind_address
        host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
        return f"http://{host}:{self.config.api_port}/metrics"

    def model_path(self, model: Model) -> str:
        """A model's directory, at the same absolute path on every node."""
        return posixpath.join(self.config.model_root, model.directory)

    @property
    def dashboard_url(self) -> str:
        """The dashboard (and its Jobs API) listens on the head's cluster address only."""
        return f"http://{self.head.cluster_address}:{self.config.ray_ports.dashboard}"

    @property
    def gateway_url(self) -> str:
        """Where clients reach the gateway: the bind address, or the head's when it binds every address."""
        bind = self.config.api_bind_address
        host = self.head.address if bind in ("0.0.0.0", "::") else bind
        return f"http://{host}:{self.config.api_port}"

    @property
    def model_stores(self) -> dict[str, ModelPlan]:
        """One store per model directory (models sharing a directory share its download)."""
        stores: dict[str, ModelPlan] = {}
        for model in self.models:
            stores.setdefault(model.directory, model)
        return stores

    def as_output(self) -> dict[str, list[dict]]:
        """Where everything lands (`pulumi stack output plan`): per model, per replica."""
        return {
            model.name: [
                {"replica": replica.id, "nodes": list(replica.nodes), "devices": list(replica.devices),
                 "tensorParallelSize": model.layout.tensor_parallel_size,
                 "pipelineParallelSize": model.layout.pipeline_parallel_size,
                 "executor": replica.executor or "single process", "url": replica.url}
                for replica in model.replicas
            ]
            for model in self.models
        }


def _ssh_target(config: StackConfig, node: Node) -> SshTarget:
    return SshTarget(node.ssh_user or config.ssh_user, node.address, node.ssh_port or config.ssh_port)


def demands(config: StackConfig, profile: Profile) -> list[Demand]:
    """What each model asks of the devices (raises LayoutError for a layout that cannot run)."""
    gpus = [node.gpus for node in config.nodes]
    found = []
    for i, model in enumerate(config.models):
        world = resolve_layout(model, profile=profile, gpus=gpus).world_size
        found.append(Demand(f"models[{i}]", model.replicas, world, spans_nodes=bool(profile.has_gpus) and world > max(gpus),
                            spare=model.update_strategy == "blueGreen"))
    return found


def replica_ports(config: StackConfig, slots: list[list[Slot]]) -> list[list[tuple[int, int, str]]]:
    """Per model, per replica: (home node index, port, stack key). A model's replicas sharing a node
    take its port, port + 100, port + 200, ..."""
    return [
        [(slot.nodes[0], server_port(config, i) + PORT_STRIDE * slot.ordinal, server_port_key(config, i))
         for slot in model_slots]
        for i, model_slots in enumerate(slots)
    ]


# The Ray ports every node opens; the head opens all of rayPorts.
WORKER_RAY_PORTS = ("objectManager", "nodeManager", "metricsExport", "dashboardAgentGrpc", "dashboardAgentListen",
                    "runtimeEnvAgent")


def node_ports(config: StackConfig) -> list[list[tuple[int, str]]]:
    """Per node, the ports its preflight checks: Ray's, and on the head the gateway's and the fabric check's.
    A replica's own port is its launcher's to check, so adding one touches no host."""
    named = config.ray_ports.named()
    head = [(port, f"rayPorts.{key}") for key, port in named.items()]
    head += [(config.api_port, "apiPort")] + [(config.cluster_check_port, "clusterCheckPort")] * bool(config.workers)
    worker = [(named[key], f"rayPorts.{key}") for key in WORKER_RAY_PORTS]
    return [head] + [list(worker) for _ in config.workers]


def node_extra_env(config: StackConfig, node: Node) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**config.extra_env, **node.extra_env}.items()))


def node_interfaces(config: StackConfig, node: Node, key: str) -> tuple[Interface, ...]:
    found = []
    for kind, stack_value, stack_key in (("nccl", config.nccl_socket_ifname, "ncclSocketIfname"),
                                         ("gloo", config.gloo_socket_ifname, "glooSocketIfname")):
        name, source = (node.interface, f"{key}.interface") if node.interface else (stack_value, stack_key)
        found.append(Interface(kind, name, source, derived=name is None and bool(config.workers)))
    return tuple(found)


def make_plan(config: StackConfig) -> Plan:
    """The plan of a validated config (components/checks.py has refused everything that does not fit)."""
    profile = PROFILES[config.accelerator]
    name = lambda role: f"{config.cluster_name}-{role}"  # noqa: E731
    gpus = [node.gpus for node in config.nodes]
    wanted = demands(config, profile)
    slots = place(gpus, wanted)
    ports = node_ports(config)
    ray_devices: list[set[int]] = [set() for _ in gpus]
    for demand, model_slots in zip(wanted, slots):
        for slot in model_slots if demand.spans_nodes else ():
            for node in slot.nodes:
                ray_devices[node].update(slot.devices)

    def node_plan(i: int, node: Node) -> NodePlan:
        role: Role = "head" if i == 0 else "worker"
        key = "head" if i == 0 else f"workers[{i - 1}]"
        return NodePlan(key, node.label, role, node.address, node.cluster_address or node.address, node.gpus,
                        _ssh_target(config, node), name(f"ray-{role}"), tuple(ports[i]),
                        node_interfaces(config, node, key), tuple(sorted(ray_devices[i])), node_extra_env(config, node))

    nodes = [node_plan(i, node) for i, node in enumerate(config.nodes)]
    models = []
    for i, (model, demand, model_slots, model_ports) in enumerate(
            zip(config.models, wanted, slots, replica_ports(config, slots))):
        layout = resolve_layout(model, profile=profile, gpus=gpus)
        executor = "ray" if demand.spans_nodes else ("mp" if layout.world_size > 1 else None)
        replicas = []
        spare = None
        if demand.spare:  # the last slot is the first replica's spare
            spare = (model_slots[-1].devices, model_ports[-1][1])
            model_slots, model_ports = model_slots[:-1], model_ports[:-1]
        for r, (slot, (_, port, _)) in enumerate(zip(model_slots, model_ports)):
            home = nodes[slot.nodes[0]]
            replicas.append(ReplicaPlan(
                r, home, tuple(nodes[n].label for n in slot.nodes), slot.devices, port,
                "127.0.0.1" if home.role == "head" else home.cluster_address, executor,
                name(f"server-{model.name}-{r}"), f"{model.name}/{r}", spare,
            ))
        models.append(ModelPlan(i, model, layout, tuple(replicas)))
    cluster = ClusterReadiness(f"{nodes[0].cluster_address}:{config.ray_ports.gcs}", len(nodes),
                               sum(len(node.ray_devices) for node in nodes), config.timeouts.cluster_ready)
    fabric = FabricCheck(config.cluster_check_port, config.timeouts.cluster_check,
                         nccl=profile.has_gpus and cluster.expected_gpus > 0) if config.workers else None
    return Plan(config, profile, nodes[0], tuple(nodes[1:]), tuple(models), cluster, fabric)
