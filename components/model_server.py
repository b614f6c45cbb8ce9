"""ModelServer: one served model's replicas. Each is the launcher in its own container on its home
node (Docker's restart policy supervises it), a health gate, and a route file on the head through
which the gateway learns of it without restarting.

A settings change replaces the replicas one at a time: replica k's container waits for replica
k-1's route, and a container is replaced delete-before-replace (its name is fixed), which first
deletes its route — the gateway drains it — so capacity never drops below N-1 replicas.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import ModelPlan, Plan, ReplicaPlan
from components.specs import REPLICA_KEY_ENV, server_container_spec

HEALTH_POLL_SECONDS = 5


def server_health_script(container: str, url: str, timeout_s: int) -> str:
    """Wait until the server answers /health; on timeout show its last log lines, not a bare error."""
    name = shlex.quote(container)
    probe = f"import urllib.request; urllib.request.urlopen('{url}/health', timeout=5)"
    return "\n".join([
        f"deadline=$(( $(date +%s) + {timeout_s} ))",
        f"until docker exec {name} python3 -c {shlex.quote(probe)} >/dev/null 2>&1; do",
        '  if [ "$(date +%s)" -ge "$deadline" ]; then',
        f'    echo "model server {container} is not healthy after {timeout_s}s (timeouts.serverReady); its last log lines:" >&2',
        f"    docker logs --tail 40 {name} >&2",
        "    exit 1",
        "  fi",
        f"  sleep {HEALTH_POLL_SECONDS}",
        "done",
        f"echo {name} healthy",
    ])


def route_file(plan: Plan, model: ModelPlan, replica: ReplicaPlan) -> str:
    return f"{plan.routes_dir}/{model.name}-{replica.index}.json"


def route_script(plan: Plan, model: ModelPlan, replica: ReplicaPlan) -> str:
    """On the head: the replica's route file, written whole (the gateway never reads half a file)."""
    path = route_file(plan, model, replica)
    route = json.dumps({"model": model.name, "replica": replica.id, "url": replica.url, "node": replica.home.label},
                       sort_keys=True)
    temporary = f"{plan.routes_dir}/.{model.name}-{replica.index}.tmp"
    return "\n".join([
        "set -eu",
        f"mkdir -p {shlex.quote(plan.routes_dir)}",
        f"printf '%s\\n' {shlex.quote(route)} > {shlex.quote(temporary)}",
        f"mv {shlex.quote(temporary)} {shlex.quote(path)}",
    ])


def unroute_script(plan: Plan, replica: ReplicaPlan, path: str) -> str:
    """On the head: remove the route, then let the gateway finish what the replica is answering."""
    gateway = shlex.quote(plan.container_name("gateway"))
    drain = shlex.join(["node-runtime", "gateway", "drain", "--replica", replica.id,
                        "--metrics-url", plan.gateway_metrics_url, "--timeout", str(plan.config.timeouts.drain)])
    return "\n".join([
        "set -eu",
        f"rm -f {shlex.quote(path)}",
        # No gateway running (first deploy, or it is being removed too): nothing to drain.
        f"if [ \"$(docker inspect --format '{{{{.State.Running}}}}' {gateway} 2>/dev/null)\" = true ]; then",
        f"  docker exec {gateway} {drain}",
        "fi",
    ])


@dataclass
class ModelServerArgs:
    plan: Plan
    model: ModelPlan
    hosts: dict[str, Host]
    image_ids: dict[str, pulumi.Input[str]]
    cluster_ready: pulumi.Resource
    model_verified: list[pulumi.Resource]
    internal_key: pulumi.Input[str]


class ModelServer(pulumi.ComponentResource):
    """`routed` lists each replica's route: the gateway waits for them on its first start."""

    routed: list[pulumi.Resource]

    def __init__(self, name: str, args: ModelServerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:ModelServer", name, None, opts)
        plan, model = args.plan, args.model
        head = args.hosts[plan.head.label]
        server_ready = plan.config.timeouts.server_ready
        key_env = pulumi.Output.secret(
            pulumi.Output.from_input(args.internal_key).apply(lambda key: [f"{REPLICA_KEY_ENV}={key}"])
        )
        self.routed = []
        previous: list[pulumi.Resource] = []
        for replica in model.replicas:
            host = args.hosts[replica.home.label]
            spec = server_container_spec(plan, model, replica)
            child = f"{name}-{replica.index}"
            # Replica 0 keeps the URNs of the one server a model had before replicas.
            before = (lambda role: [pulumi.Alias(name=f"{name}-{role}")]) if replica.index == 0 else (lambda role: [])
            container = host.container(
                f"{child}-container",
                spec,
                image=args.image_ids[host.label],
                parent=self,
                depends_on=[args.cluster_ready, *args.model_verified, *previous],
                secret_envs=key_env,
                delete_before_replace=True,
                aliases=before("container"),
            )
            healthy = host.command(
                f"{child}-healthy",
                server_health_script(spec.name, replica.url, server_ready),
                triggers=[container.id],
                timeout=server_ready + 60,
                parent=self,
                depends_on=[container],
                aliases=before("healthy"),
            )
            path = route_file(plan, model, replica)
            routed = head.command(
                f"{child}-routed",
                route_script(plan, model, replica),
                delete=unroute_script(plan, replica, path),
                triggers=[container.id],
                timeout=plan.config.timeouts.drain + 60,
                parent=self,
                depends_on=[healthy],
            )
            self.routed.append(routed)
            previous = [routed]
        layout = model.layout
        self.summary = {
            "name": model.name, "id": model.model.id, "revision": model.model.revision,
            "tensorParallelSize": layout.tensor_parallel_size, "pipelineParallelSize": layout.pipeline_parallel_size,
            "port": model.replicas[0].port, "replicas": len(model.replicas),
        }
        self.register_outputs({"replicas": [replica.id for replica in model.replicas]})
