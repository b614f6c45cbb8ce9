"""RayHead: the head node's Ray container (`ray start --head --block`)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import Plan
from components.specs import node_container_spec, ray_start_command


@dataclass
class RayHeadArgs:
    plan: Plan
    host: Host
    image_id: pulumi.Input[str]


class RayHead(pulumi.ComponentResource):
    def __init__(self, name: str, args: RayHeadArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:RayHead", name, None, opts)
        plan, node = args.plan, args.plan.head
        spec = node_container_spec(plan, node, "ray-head", ray_start_command(plan, node), node.ray_devices)
        self.container = args.host.container(
            f"{name}-container", spec, image=args.image_id, parent=self, depends_on=args.host.ready
        )
        self.register_outputs({"containerId": self.container.id, "address": plan.cluster.ray_address})
