"""Gateway: the one public endpoint (the guide's /, /generate, /batch_generate, /metrics, /health,
and OpenAI /v1/*), routing by model to the servers on the head."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import Plan
from components.specs import API_KEY_ENV, gateway_container_spec


@dataclass
class GatewayArgs:
    plan: Plan
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
                pulumi.Output.from_input(args.api_key).apply(lambda key: [f"{API_KEY_ENV}={key}"])
            )
        self.container = args.host.container(
            f"{name}-container",
            gateway_container_spec(args.plan),
            image=args.image_id,
            parent=self,
            depends_on=args.servers_healthy,
            secret_envs=secret_envs,
        )
        self.url = args.plan.gateway_url
        self.register_outputs({"containerId": self.container.id, "url": self.url})
