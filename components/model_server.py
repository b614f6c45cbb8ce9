"""ModelServer: one served model's replicas. Each is the launcher in its own container on its home
node (Docker's restart policy supervises it), a health gate, and a route file on the head through
which the gateway learns of it without restarting.

A settings change replaces the replicas one at a time: replica k's container waits for replica
k-1's route, and a container is replaced delete-before-replace (its name is fixed), which first
deletes its route — the gateway drains it — so capacity never drops below N-1 replicas.

A blue-green replica (updateStrategy: blueGreen, one replica with room for a second copy on its
node) is instead named after its settings: a change starts a new copy on the slot the running one
does not hold, routes to it once healthy, and removes the old copy (drained first) at the end of the
update, as Pulumi deletes what a program no longer declares.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace

import pulumi

from components.host import Host
from components.plan import ModelPlan, Plan, ReplicaPlan
from components.specs import REPLICA_KEY_ENV, generation, server_container_spec

HEALTH_POLL_SECONDS = 5


# Where a blue-green copy's launcher writes the URL of the slot it took (docs/runtime-contract.md).
SERVING_URL_FILE = "/tmp/node-runtime-url"


def server_health_script(container: str, url: str | None, timeout_s: int) -> str:
    """Wait until the server answers /health, then print its URL (the last line); on timeout show
    its last log lines, not a bare error. url None: the launcher chose it (SERVING_URL_FILE)."""
    name = shlex.quote(container)
    probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=5)"
    find = f"url={shlex.quote(url)}" if url else f"url=$(docker exec {name} cat {SERVING_URL_FILE} 2>/dev/null)"
    return "\n".join([
        f"deadline=$(( $(date +%s) + {timeout_s} ))",
        f'until {find} && [ -n "$url" ] && docker exec {name} python3 -c {shlex.quote(probe)} "$url" >/dev/null 2>&1; do',
        '  if [ "$(date +%s)" -ge "$deadline" ]; then',
        f'    echo "model server {container} is not healthy after {timeout_s}s (timeouts.serverReady); its last log lines:" >&2',
        f"    docker logs --tail 40 {name} >&2",
        "    exit 1",
        "  fi",
        f"  sleep {HEALTH_POLL_SECONDS}",
        "done",
        'echo "$url"',
    ])


@dataclass(frozen=True)
class Copy:
    """One running copy of a replica: its resources' name, its container, and how the gateway knows it.
    A rolling replica has one copy for good; a blue-green one a new copy for every change."""

    resource: str
    container: str
    id: str  # the gateway's replica label
    route: str  # its route file's name

    def route_file(self, plan: Plan) -> str:
        return f"{plan.routes_dir}/{self.route}.json"


def route_script(plan: Plan, copy: Copy, url: str, node: str, model: str) -> str:
    """On the head: the copy's route file, written whole (the gateway never reads half a file)."""
    route = json.dumps({"model": model, "replica": copy.id, "url": url, "node": node}, sort_keys=True)
    temporary = f"{plan.routes_dir}/.{copy.route}.tmp"
    return "\n".join([
        "set -eu",
        f"mkdir -p {shlex.quote(plan.routes_dir)}",
        f"printf '%s\\n' {shlex.quote(route)} > {shlex.quote(temporary)}",
        f"mv {shlex.quote(temporary)} {shlex.quote(copy.route_file(plan))}",
    ])


def unroute_script(plan: Plan, copy: Copy) -> str:
    """On the head: remove the route, then let the gateway finish what the copy is answering."""
    gateway = shlex.quote(plan.container_name("gateway"))
    drain = shlex.join(["node-runtime", "gateway", "drain", "--replica", copy.id,
                        "--metrics-url", plan.gateway_metrics_url, "--timeout", str(plan.config.timeouts.drain)])
    return "\n".join([
        "set -eu",
        f"rm -f {shlex.quote(copy.route_file(plan))}",
        # No gateway running (first deploy, or it is being removed too): nothing to drain.
        f"if [ \"$(docker inspect --format '{{{{.State.Running}}}}' {gateway} 2>/dev/null)\" = true ]; then",
        f"  docker exec {gateway} {drain}",
        "fi",
    ])


def copy_of(name: str, model: ModelPlan, replica: ReplicaPlan, container: str, generation: str | None) -> Copy:
    if generation is None:
        return Copy(f"{name}-{replica.index}", container, replica.id, f"{model.name}-{replica.index}")
    return Copy(f"{name}-{replica.index}-{generation}", f"{container}-{generation}", f"{replica.id}-{generation}",
                f"{model.name}-{replica.index}-{generation}")


@dataclass
class ModelServerArgs:
    plan: Plan
    model: ModelPlan
    hosts: dict[str, Host]
    image_ids: dict[str, pulumi.Input[str]]
    cluster_ready: pulumi.Resource
    model_verified: list[pulumi.Resource]
    internal_key: pulumi.Input[str]
    # The node image's tag (a hash of its recipe): a blue-green copy's name follows it.
    image_tag: str


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
            copy = copy_of(name, model, replica, spec.name,
                           generation(spec, args.image_tag) if replica.spare else None)
            # Replica 0 keeps the URNs of the one server a model had before replicas.
            before = (lambda role: [pulumi.Alias(name=f"{name}-{role}")]) if copy.resource == f"{name}-0" else (lambda role: [])
            container = host.container(
                f"{copy.resource}-container",
                replace(spec, name=copy.container),
                image=args.image_ids[host.label],
                parent=self,
                depends_on=[args.cluster_ready, *args.model_verified, *previous],
                secret_envs=key_env,
                delete_before_replace=True,
                aliases=before("container"),
            )
            healthy = host.command(
                f"{copy.resource}-healthy",
                server_health_script(copy.container, None if replica.spare else replica.url, server_ready),
                triggers=[container.id],
                timeout=server_ready + 60,
                parent=self,
                depends_on=[container],
                aliases=before("healthy"),
            )
            # A blue-green copy's URL is the slot its launcher took, which its health gate printed.
            url = healthy.stdout.apply(lambda out: (out.strip().splitlines() or [""])[-1]) if replica.spare else replica.url
            routed = head.command(
                f"{copy.resource}-routed",
                pulumi.Output.from_input(url).apply(
                    lambda u, c=copy, r=replica: route_script(plan, c, u, r.home.label, model.name)),
                delete=unroute_script(plan, copy),
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
