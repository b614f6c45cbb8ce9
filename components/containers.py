"""Plain functions that build what the node containers run: Ray command lines, env, mounts, options.

Every container of a node (Ray head or worker, model server, gateway) shares one base spec so a
node's devices, address and interfaces cannot drift between them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.accelerators import PROFILES
from components.config import Model, Node, StackConfig, shm_size_mb

if TYPE_CHECKING:
    import pulumi
    import pulumi_docker as docker

    from components.host import Host

RESTART_POLICY = "unless-stopped"
SERVER_ENTRY = ("node-runtime", "serve")
GATEWAY_ENTRY = ("node-runtime", "gateway")


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
    network_mode: str = "host"
    ipc_mode: str = "host"
    # A model server is a Ray driver in a sibling container of the head; sharing the host's PID
    # namespace keeps Ray's process bookkeeping between them consistent.
    pid_mode: str | None = "host"
    restart: str = RESTART_POLICY


def container_name(config: StackConfig, role: str) -> str:
    return f"{config.cluster_name}-{role}"


def ray_temp_dir(config: StackConfig) -> str:
    return f"{config.data_root}/ray"


def relay_key_path(config: StackConfig) -> str:
    return f"{config.data_root}/ssh/relay_ed25519"


def node_env(config: StackConfig, node: Node) -> dict[str, str]:
    """What Ray, vLLM and the collective libraries must agree on before `ray start`."""
    env = {
        # One address for both Ray and vLLM, or placement groups never schedule.
        "VLLM_HOST_IP": node.address,
        "RAY_NODE_IP_ADDRESS": node.address,
        "HF_HUB_OFFLINE": "1",
    }
    nccl = node.interface or config.nccl_socket_ifname
    gloo = node.interface or config.gloo_socket_ifname
    if nccl:
        env["NCCL_SOCKET_IFNAME"] = nccl
    if gloo:
        # vLLM's Ray executor does not forward GLOO_* to workers: it must be here on every node.
        env["GLOO_SOCKET_IFNAME"] = gloo
    env.update(PROFILES[config.accelerator].env(node.gpus, mount_dtk=config.mount_dtk))
    return env


def node_container_spec(config: StackConfig, node: Node, role: str, command: list[str]) -> ContainerSpec:
    profile = PROFILES[config.accelerator]
    mounts = [(config.model_root, False), (ray_temp_dir(config), False)]
    mounts += [(path, True) for path in profile.mounts(mount_dtk=config.mount_dtk)]
    return ContainerSpec(
        name=container_name(config, role),
        command=command,
        envs=node_env(config, node),
        devices=list(profile.devices),
        group_adds=list(profile.group_adds),
        capabilities=list(profile.capabilities),
        security_opts=list(profile.security_opts),
        bind_mounts=mounts,
        shm_size_mb=shm_size_mb(config.shm_size),
    )


def ray_start_command(config: StackConfig, node: Node) -> list[str]:
    """`ray start --block` for the head (node is config.head) or a worker joining it."""
    ports = config.ray_ports
    common = [
        f"--node-ip-address={node.address}",
        f"--num-gpus={node.gpus}",
        f"--object-manager-port={ports.object_manager}",
        f"--node-manager-port={ports.node_manager}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--metrics-export-port={ports.metrics_export}",
        "--disable-usage-stats",
        "--block",
    ]
    if node is config.head:
        role = [
            "--head",
            f"--port={ports.gcs}",
            f"--temp-dir={ray_temp_dir(config)}",
            "--dashboard-host=0.0.0.0",
            f"--dashboard-port={ports.dashboard}",
            f"--ray-client-server-port={ports.client_server}",
        ]
    else:
        # Ray takes the temp dir from the head; workers keep theirs under the same dataRoot path.
        role = [f"--address={config.head.address}:{ports.gcs}"]
    return ["ray", "start", *role, *common]


def cluster_readiness(config: StackConfig) -> dict[str, Any]:
    return {
        "ray_address": f"{config.head.address}:{config.ray_ports.gcs}",
        "expected_nodes": len(config.nodes),
        "expected_gpus": config.total_gpus,
        "gpus_per_node": config.gpus_per_node,
        "timeout_s": config.timeouts.cluster_ready,
    }


def serve_spec(config: StackConfig, index: int) -> dict[str, Any]:
    """The launcher's NODE_RUNTIME_SERVE_SPEC for models[index] (docs/runtime-contract.md)."""
    model: Model = config.models[index]
    return {
        "served_model_name": model.name,
        "model_path": f"{config.model_root}/{model.directory}",
        "host": "127.0.0.1",
        "port": config.server_port(index),
        "accelerator": config.accelerator,
        "tensor_parallel_size": model.tensor_parallel_size,
        "pipeline_parallel_size": model.pipeline_parallel_size,
        "quantization": model.quantization,
        "dtype": model.dtype,
        "max_num_seqs": model.max_num_seqs,
        "max_num_batched_tokens": model.max_num_batched_tokens,
        "max_model_len": model.max_model_len,
        "gpu_memory_utilization": model.gpu_memory_utilization,
        "extra_args": list(model.extra_args),
        "cluster": cluster_readiness(config),
    }


def gateway_config(config: StackConfig) -> dict[str, Any]:
    """The gateway's NODE_RUNTIME_GATEWAY_CONFIG (docs/runtime-contract.md)."""
    return {
        "host": config.api_bind_address,
        "port": config.api_port,
        "servers": [
            {"name": model.name, "url": f"http://127.0.0.1:{config.server_port(i)}"}
            for i, model in enumerate(config.models)
        ],
        "cluster": cluster_readiness(config),
        "max_batch_size": config.max_batch_size,
        "request_timeout_s": config.timeouts.server_ready,
        "workers": config.gateway_workers,
    }


def to_env_json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def runtime_run(config: StackConfig, image: str, args: list[str], *, mounts: list[str], env_names: tuple[str, ...] = ()) -> str:
    """A one-off `docker run` of the node image on a host, for the model store's steps.

    Secrets reach it only by name (`-e NAME` copies the caller's variable), never by value.
    """
    parts = ["docker", "run", "--rm", "-i", "--network", "host"]
    for path in mounts:
        parts += ["-v", f"{path}:{path}"]
    for name in env_names:
        parts += ["-e", name]
    return shlex.join([*parts, image, "node-runtime", *args])


def declare_container(
    name: str,
    spec: ContainerSpec,
    *,
    image: pulumi.Input[str],
    host: Host,
    parent: pulumi.Resource,
    depends_on: list[pulumi.Resource],
    secret_envs: pulumi.Input[list[str]] | None = None,
) -> docker.Container:
    """The one place a node container becomes a docker.Container."""
    import pulumi
    import pulumi_docker as docker

    envs: pulumi.Input[list[str]] = [f"{k}={v}" for k, v in sorted(spec.envs.items())]
    if secret_envs is not None:
        envs = pulumi.Output.all(envs, secret_envs).apply(lambda parts: parts[0] + parts[1])
    return docker.Container(
        name,
        name=spec.name,
        image=image,
        command=spec.command,
        envs=envs,
        network_mode=spec.network_mode,
        ipc_mode=spec.ipc_mode,
        pid_mode=spec.pid_mode,
        shm_size=spec.shm_size_mb,
        restart=spec.restart,
        devices=[docker.ContainerDeviceArgs(host_path=d, container_path=d, permissions="rwm") for d in spec.devices],
        group_adds=spec.group_adds or None,
        capabilities=docker.ContainerCapabilitiesArgs(adds=spec.capabilities) if spec.capabilities else None,
        security_opts=spec.security_opts or None,
        mounts=[
            docker.ContainerMountArgs(type="bind", source=path, target=path, read_only=read_only)
            for path, read_only in spec.bind_mounts
        ],
        # Model files and Ray's state are bind mounts: removing a container never touches them.
        remove_volumes=False,
        opts=pulumi.ResourceOptions(parent=parent, provider=host.provider, depends_on=depends_on),
    )
