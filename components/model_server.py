"""ModelServer: one served model — the launcher in its own container on the head, supervised by
Docker's restart policy — and a health gate the gateway waits for. Changing one model's settings
replaces this container alone; the Ray containers never see it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import ModelPlan, Plan
from components.specs import server_container_spec

HEALTH_POLL_SECONDS = 5


def server_health_script(container: str, port: int, timeout_s: int) -> str:
    """Wait until the server answers /health; on timeout show its last log lines, not a bare error."""
    name = shlex.quote(container)
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=5)"
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


@dataclass
class ModelServerArgs:
    plan: Plan
    model: ModelPlan
    host: Host
    image_id: pulumi.Input[str]
    cluster_ready: pulumi.Resource
    model_verified: list[pulumi.Resource]


class ModelServer(pulumi.ComponentResource):
    def __init__(self, name: str, args: ModelServerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:ModelServer", name, None, opts)
        plan, model = args.plan, args.model
        spec = server_container_spec(plan, model)
        self.container = args.host.container(
            f"{name}-container",
            spec,
            image=args.image_id,
            parent=self,
            depends_on=[args.cluster_ready, *args.model_verified],
        )
        server_ready = plan.config.timeouts.server_ready
        self.healthy = args.host.command(
            f"{name}-healthy",
            server_health_script(spec.name, model.port, server_ready),
            triggers=[self.container.id],
            timeout=server_ready + 60,
            parent=self,
            depends_on=[self.container],
        )
        self.url = f"http://127.0.0.1:{model.port}"
        self.summary = {
            "name": model.name, "id": model.model.id, "revision": model.model.revision,
            "tensorParallelSize": model.layout.tensor_parallel_size,
            "pipelineParallelSize": model.layout.pipeline_parallel_size, "port": model.port,
        }
        self.register_outputs({"containerId": self.container.id, "url": self.url})
