"""Gateway: the one public endpoint (the guide's /, /generate, /batch_generate, /metrics, /health,
and OpenAI /v1/*), routing by model to the servers on the head."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import Plan
from components.specs import API_KEY_ENV, API_KEYS_ENV, INTERNAL_KEY_ENV, api_key_values, gateway_container_spec


@dataclass
class GatewayArgs:
    plan: Plan
    host: Host
    image_id: pulumi.Input[str]
    # Every replica's route: the gateway starts once all are up. Only ordering: a replica's change
    # (a new route) never replaces the gateway.
    routes: list[pulumi.Resource]
    internal_key: pulumi.Input[str]
    api_key: pulumi.Input[str] | None = None
    api_keys: pulumi.Input[str] | None = None  # the apiKeys secret: its JSON list, values included


class Gateway(pulumi.ComponentResource):
    def __init__(self, name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:Gateway", name, None, opts)
        keys = pulumi.Output.all(args.internal_key, args.api_key, args.api_keys).apply(
            lambda keys: [f"{INTERNAL_KEY_ENV}={keys[0]}"] + ([f"{API_KEY_ENV}={keys[1]}"] if keys[1] else [])
            + ([f"{API_KEYS_ENV}={api_key_values(keys[2])}"] if keys[2] else [])
        )
        self.container = args.host.container(
            f"{name}-container",
            gateway_container_spec(args.plan),
            image=args.image_id,
            parent=self,
            depends_on=args.routes,
            secret_envs=pulumi.Output.secret(keys),
        )
        self.url = args.plan.gateway_url
        self.register_outputs({"containerId": self.container.id, "url": self.url})
