"""RayWorker: one worker node's Ray container, joined to the head."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import Plan
from components.ray_head import RayHead
from components.specs import node_container_spec, ray_start_command


@dataclass
class RayWorkerArgs:
    plan: Plan
    host: Host
    image_id: pulumi.Input[str]
    head: RayHead


class RayWorker(pulumi.ComponentResource):
    def __init__(self, name: str, args: RayWorkerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:RayWorker", name, None, opts)
        node = args.host.node
        spec = node_container_spec(args.plan, node, "ray-worker", ray_start_command(args.plan, node), node.ray_devices)
        self.container = args.host.container(
            f"{name}-container",
            spec,
            image=args.image_id,
            parent=self,
            depends_on=[*args.host.ready, args.head.container],
        )
        self.register_outputs({"containerId": self.container.id, "address": node.address})
