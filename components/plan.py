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
    """The concrete (TP, PP) of `model` on nodes with `gpus` devices each. 0 = auto: TP = the GPUs of
    one node, PP = the number of nodes (vLLM's multi-node advice); a pinned TP keeps PP 1 unless PP
    is pinned too, so a model given a TP of its own leaves the other nodes to other models."""
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
                f"tensorParallelSize: 0 (all GPUs) needs the same GPU count on every node, "
                f"found {gpus}; set tensorParallelSize and pipelineParallelSize explicitly"
            )
        tp, pp = gpus[0], pp or len(gpus)
    layout = Layout(tp, pp or 1)
    world, total, smallest = layout.world_size, sum(gpus), min(gpus)
    if world > total:
        raise LayoutError(
            f"tensorParallelSize: {tp} x pipelineParallelSize {layout.pipeline_parallel_size} = {world} GPUs, "
            f"but the cluster has {total}; lower them or add workers"
        )
    if tp > smallest and tp % smallest:
        raise LayoutError(
            f"tensorParallelSize: {tp} does not fill whole nodes of {smallest} GPUs; "
            f"use a divisor of {smallest} or a multiple of it"
        )
    if world > smallest and world % smallest:
        raise LayoutError(
            f"pipelineParallelSize: {tp} x {layout.pipeline_parallel_size} = {world} GPUs spans nodes without "
            f"filling them ({smallest} per node); make tensorParallelSize x pipelineParallelSize a multiple of it"
        )
    return layout


def server_port(config: StackConfig, index: int) -> int:
    """The private port of models[index]'s server: its own `port`, else serverPortBase + index."""
    return config.models[index].port or config.server_port_base + index


def server_port_key(config: StackConfig, index: int) -> str:
    """The stack key an operator changes to move models[index]'s port."""
    return f"models[{index}].port" if config.models[index].port else f"serverPortBase (+{index} for models[{index}])"


@dataclass(frozen=True)
class NodePlan:
    label: str
    role: Role
    address: str
    gpus: int
    ssh: SshTarget
    # The container running Ray there: the preflight leaves ports alone that this stack's own Ray holds.
    ray_container: str
    # (port, stack key) the preflight requires free before anything runs there.
    ports: tuple[tuple[int, str], ...]
    # The interfaces NCCL/RCCL and Gloo use there: the node's own, else the stack's; None = theirs to pick.
    nccl_interface: str | None
    gloo_interface: str | None

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(range(self.gpus))


@dataclass(frozen=True)
class ModelPlan:
    index: int
    model: Model
    port: int
    layout: Layout
    executor: str | None
    container: str

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def directory(self) -> str:
        return self.model.directory


@dataclass(frozen=True)
class ClusterReadiness:
    """What `cluster wait`, each server and the gateway's /health expect of Ray."""

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

    def model_path(self, model: Model) -> str:
        """A model's directory, at the same absolute path on every node."""
        return posixpath.join(self.config.model_root, model.directory)

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:{self.config.ray_ports.dashboard}"

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


def _ssh_target(config: StackConfig, node: Node) -> SshTarget:
    return SshTarget(node.ssh_user or config.ssh_user, node.address, node.ssh_port or config.ssh_port)


def _head_ports(config: StackConfig) -> tuple[tuple[int, str], ...]:
    ports = [(port, f"rayPorts.{key}") for key, port in config.ray_ports.named().items()]
    ports.append((config.api_port, "apiPort"))
    ports += [(server_port(config, i), f"models[{i}].port") for i in range(len(config.models))]
    return tuple(ports)


def _worker_ports(config: StackConfig) -> tuple[tuple[int, str], ...]:
    ray = config.ray_ports
    return (
        (ray.object_manager, "rayPorts.objectManager"),
        (ray.node_manager, "rayPorts.nodeManager"),
        (ray.metrics_export, "rayPorts.metricsExport"),
    )


def make_plan(config: StackConfig) -> Plan:
    """The plan of a validated config (components/checks.py has refused everything that does not fit)."""
    profile = PROFILES[config.accelerator]
    name = lambda role: f"{config.cluster_name}-{role}"  # noqa: E731

    def node_plan(node: Node, role: Role, ports: tuple[tuple[int, str], ...]) -> NodePlan:
        return NodePlan(node.label, role, node.address, node.gpus, _ssh_target(config, node), name(f"ray-{role}"), ports,
                        node.interface or config.nccl_socket_ifname, node.interface or config.gloo_socket_ifname)

    head = node_plan(config.head, "head", _head_ports(config))
    workers = tuple(node_plan(node, "worker", _worker_ports(config)) for node in config.workers)
    gpus = [node.gpus for node in config.nodes]
    models = []
    for i, model in enumerate(config.models):
        layout = resolve_layout(model, profile=profile, gpus=gpus)
        models.append(ModelPlan(i, model, server_port(config, i), layout, profile.executor_for(layout.world_size),
                                name(f"server-{model.name}")))
    cluster = ClusterReadiness(f"{config.head.address}:{config.ray_ports.gcs}", len(gpus), sum(gpus),
                               config.timeouts.cluster_ready)
    return Plan(config, profile, head, workers, tuple(models), cluster)
