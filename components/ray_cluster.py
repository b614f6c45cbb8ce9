"""RayCluster: the Ray head, a worker on every other node, the gate that opens once Ray reports every
node and GPU, and the fabric check after it — what every model server waits for."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import FabricCheck, Plan
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


def cluster_check_script(plan: Plan, fabric: FabricCheck) -> str:
    """Run on the head once Ray is ready: the same Python/Ray/vLLM/torch on every node, and an all-reduce
    across them over the configured interfaces (Gloo; with NCCL/RCCL where Ray owns GPUs), within the
    timeout; a failure names the node and interface that did not connect, instead of a hang later."""
    cluster = plan.cluster
    return shlex.join([
        "docker", "exec", plan.head.ray_container, "node-runtime", "cluster", "check",
        "--address", cluster.ray_address, "--nodes", str(cluster.expected_nodes),
        "--port", str(fabric.port), "--timeout", str(fabric.timeout_s), *(["--nccl"] if fabric.nccl else []),
    ])


VERSION_KEYS = ("python", "ray", "vllm", "torch")


def node_versions(plan: Plan, stdout: str) -> dict[str, dict[str, str | None]]:
    """Per node label, the versions its image runs, from the check's JSON summary (its last JSON line;
    nothing before the check has run)."""
    labels = {node.cluster_address: node.label for node in plan.nodes}
    for line in reversed(stdout.strip().splitlines()):
        try:
            summary = json.loads(line)
        except ValueError:
            continue
        if isinstance(summary, dict) and "nodes" in summary:
            return {labels.get(node["address"], node["address"]): {key: node.get(key) for key in VERSION_KEYS}
                    for node in summary["nodes"]}
    return {}


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
    """`ready`: Ray has every node and GPU the plan expects. `checked`, after it, is the gate the model
    servers wait for: with workers, the same software everywhere and a working collective, `versions`
    what it found; on one node, `ready` itself."""

    ready: pulumi.Resource
    checked: pulumi.Resource
    versions: pulumi.Output[dict[str, dict[str, str | None]]]

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
        # Both run again whenever a Ray container is replaced (a new image, a changed setting).
        triggers = [container.id for container in containers]
        self.ready = args.head.command(
            f"{name}-ready", cluster_wait_script(plan), triggers=triggers, timeout=plan.cluster.timeout_s + 60,
            parent=self, depends_on=containers,
            aliases=[pulumi.Alias(name=f"{args.previous_parent_name}-cluster-ready", parent=args.previous_parent)],
        )
        self.checked, self.versions = self.ready, pulumi.Output.from_input({})
        if plan.fabric is not None:
            checked = args.head.command(
                f"{name}-checked", cluster_check_script(plan, plan.fabric), triggers=triggers,
                timeout=plan.fabric.timeout_s + 60, parent=self, depends_on=[self.ready],
            )
            self.checked, self.versions = checked, checked.stdout.apply(lambda stdout: node_versions(plan, stdout))
        self.dashboard_url = plan.dashboard_url
        self.register_outputs({"address": plan.cluster.ray_address, "ready": self.ready.id, "checked": self.checked.id})
