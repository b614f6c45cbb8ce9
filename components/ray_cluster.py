"""RayCluster: the Ray head, a worker on every other node, and the gate that opens once Ray reports
every node and GPU — what every model server waits for."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import Plan
from components.ray_head import RayHead, RayHeadArgs
from components.ray_worker import RayWorker, RayWorkerArgs

def cluster_wait_script(plan: Plan) -> str:
    """Run on the head: returns once Ray reports every node and GPU, else fails naming what is missing."""
    cluster = plan.cluster
    return shlex.join([
        "docker", "exec", plan.head.ray_container, "node-runtime", "cluster", "wait",
        "--address", cluster.ray_address, "--nodes", str(cluster.expected_nodes),
        "--gpus", str(cluster.expected_gpus), "--timeout", str(cluster.timeout_s),
    ])


@dataclass
class RayClusterArgs:
    plan: Plan
    head: Host
    workers: list[Host]
    image_ids: dict[str, pulumi.Input[str]]
    # Before RayCluster existed, its resources were children of the Deployment (named
    # `previous_parent_name`): aliases keep their URNs, so existing stacks see no replacement.
    previous_parent: pulumi.Resource
    previous_parent_name: str


class RayCluster(pulumi.ComponentResource):
    """`ready` is the gate: Ray has every node and GPU the plan expects."""

    ready: pulumi.Resource

    def __init__(self, name: str, args: RayClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:RayCluster", name, None, opts)
        plan = args.plan
        moved = pulumi.ResourceOptions(parent=self, aliases=[pulumi.Alias(parent=args.previous_parent)])
        self.head = RayHead(f"{name}-head", RayHeadArgs(plan, args.head, args.image_ids[args.head.label]), moved)
        self.workers = [
            RayWorker(f"{name}-{host.label}", RayWorkerArgs(plan, host, args.image_ids[host.label], self.head), moved)
            for host in args.workers
        ]
        containers = [self.head.container, *(worker.container for worker in self.workers)]
        self.ready = args.head.command(
            f"{name}-ready",
            cluster_wait_script(plan),
            triggers=[container.id for container in containers],
            timeout=plan.cluster.timeout_s + 60,
            parent=self,
            depends_on=containers,
            aliases=[pulumi.Alias(name=f"{args.previous_parent_name}-cluster-ready", parent=args.previous_parent)],
        )
        self.dashboard_url = plan.dashboard_url
        self.register_outputs({"address": plan.cluster.ray_address, "ready": self.ready.id})
