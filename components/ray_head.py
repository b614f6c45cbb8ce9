"""RayHead: the head node's Ray container (`ray start --head --block`)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.config import StackConfig
from components.containers import declare_container, node_container_spec, ray_start_command
from components.host import Host


@dataclass
class RayHeadArgs:
    config: StackConfig
    host: Host
    image_id: pulumi.Input[str]


class RayHead(pulumi.ComponentResource):
    def __init__(self, name: str, args: RayHeadArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:RayHead", name, None, opts)
        config = args.config
        spec = node_container_spec(config, config.head, "ray-head", ray_start_command(config, config.head))
        self.container = declare_container(
            f"{name}-container", spec, image=args.image_id, host=args.host, parent=self, depends_on=args.host.ready
        )
        self.address = f"{config.head.address}:{config.ray_ports.gcs}"
        self.dashboard_url = f"http://{config.head.address}:{config.ray_ports.dashboard}"
        self.register_outputs({"containerId": self.container.id, "address": self.address})
