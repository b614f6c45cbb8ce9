"""Gateway: the one public endpoint (the guide's /, /generate, /batch_generate, /metrics, /health,
and OpenAI /v1/*), routing by model to the servers on the head."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.config import StackConfig
from components.containers import (
    GATEWAY_ENTRY, ContainerSpec, container_name, declare_container, gateway_config, ray_temp_dir, to_env_json,
)
from components.host import Host


def gateway_container_spec(config: StackConfig) -> ContainerSpec:
    """No devices, no model files: HTTP on the host network (to reach the servers on 127.0.0.1).
    Its cluster health check is a Ray driver on the head node, so like a model server it shares
    the head's Ray session directory, IPC and PID namespaces."""
    return ContainerSpec(
        name=container_name(config, "gateway"),
        command=list(GATEWAY_ENTRY),
        envs={"NODE_RUNTIME_GATEWAY_CONFIG": to_env_json(gateway_config(config))},
        devices=[],
        group_adds=[],
        capabilities=[],
        security_opts=[],
        bind_mounts=[(ray_temp_dir(config), False)],
        shm_size_mb=64,
    )


def public_url(config: StackConfig) -> str:
    host = config.head.address if config.api_bind_address in ("0.0.0.0", "::") else config.api_bind_address
    return f"http://{host}:{config.api_port}"


@dataclass
class GatewayArgs:
    config: StackConfig
    host: Host
    image_id: pulumi.Input[str]
    servers_healthy: list[pulumi.Resource]
    api_key: pulumi.Input[str] | None = None


class Gateway(pulumi.ComponentResource):
    def __init__(self, name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:Gateway", name, None, opts)
        secret_envs = None
        if args.api_key is not None:
            secret_envs = pulumi.Output.secret(
                pulumi.Output.from_input(args.api_key).apply(lambda key: [f"NODE_RUNTIME_API_KEY={key}"])
            )
        self.container = declare_container(
            f"{name}-container",
            gateway_container_spec(args.config),
            image=args.image_id,
            host=args.host,
            parent=self,
            depends_on=args.servers_healthy,
            secret_envs=secret_envs,
        )
        self.url = public_url(args.config)
        self.register_outputs({"containerId": self.container.id, "url": self.url})
