"""The e2e cluster: three simulated hosts with Docker engines, the builder engine for the node
image, the stack config the program is run with, and what the checks need to reach it.

Shared by tests/e2e/test_e2e_cluster.py and bench/e2e/bench_e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx

from tests.e2e.apply import Applier, Site
from tests.e2e.node_image import CACHE_DIR, ImageRecipe, build_image_tarball, pinned_base
from tests.support.docker_hosts import DockerCluster, DockerEngine, docker_hosts, engine

# Override when another simulated cluster holds it on this machine (CI runs nothing else).
SUBNET = os.environ.get("E2E_SUBNET", "10.78.0.0/24")
HOST_ROOT = "/srv/vllm-e2e"  # private on every host: the models and data roots live under it
MODEL_ROOT = f"{HOST_ROOT}/models"
DATA_ROOT = f"{HOST_ROOT}/data"
MODEL_SOURCE = f"{HOST_ROOT}/src/tiny-llama"  # on the head only: the model the stack adopts
MODEL_NAME = "tiny-llama"
CLUSTER_NAME = "e2e"


def stack_config(cluster: DockerCluster, base_image: str) -> dict[str, Any]:
    """The e2e stack: head + 2 workers, CPU profile, the tiny model adopted from a local dir."""
    head, *workers = cluster.hosts
    return {
        "clusterName": CLUSTER_NAME,
        "accelerator": "cpu",
        "head": {"address": head.address, "name": "head", "gpus": 0},
        "workers": [{"address": w.address, "name": f"w{i}", "gpus": 0} for i, w in enumerate(workers, 1)],
        "baseImage": base_image,
        "modelRoot": MODEL_ROOT,
        "dataRoot": DATA_ROOT,
        "minFreeDiskGb": 1,
        "shmSize": "1g",
        "timeouts": {"clusterReady": 300, "serverReady": 600},
        "gatewayWorkers": 2,  # the multi-process gateway a DCU head runs: its container stops, restarts and serves alike
        "models": [{
            "id": f"local/{MODEL_NAME}", "source": "local", "localPath": MODEL_SOURCE,
            "maxNumSeqs": 4, "maxModelLen": 256, "dtype": "float32", "extraArgs": ["--enforce-eager"],
            # On CPU this is the share of the machine's memory vLLM reserves: 0.9 would not start
            # beside the rest of the cluster (and anything else) on one machine.
            "gpuMemoryUtilization": 0.1,
        }],
    }


@dataclass
class E2E:
    cluster: DockerCluster
    builder: DockerEngine
    config: dict[str, Any]
    secrets: dict[str, str]
    applier: Applier
    workdir: Path
    image_build_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def head(self):
        return self.cluster.hosts[0]

    @property
    def workers(self):
        return self.cluster.hosts[1:]

    @property
    def gateway(self) -> str:
        return f"http://{self.head.address}:8000"

    def on_host(self, host, path: str) -> Path:
        """Where `path` (under HOST_ROOT) of `host` lies, seen from the root namespace."""
        return host.private_dirs[HOST_ROOT] / Path(path).relative_to(HOST_ROOT)

    def docker(self, host, *args: str, **kwargs):
        return self.cluster.docker(host, *args, **kwargs)

    def ray_alive_nodes(self) -> list[str]:
        """Node IPs Ray reports alive (its state API on the head's dashboard); [] while it cannot say."""
        try:
            response = httpx.get(f"http://{self.head.address}:8265/api/v0/nodes", params={"limit": 100}, timeout=30)
            nodes = response.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        return sorted(node["node_ip"] for node in nodes if node["state"] == "ALIVE")


def wait_until(predicate, *, timeout: float, interval: float = 2.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def generate(gateway: str, prompt: str, max_tokens: int) -> dict | None:
    """The guide's /generate; None while the gateway cannot answer it."""
    try:
        response = httpx.post(f"{gateway}/generate", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=120)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def health(gateway: str) -> tuple[int, dict]:
    try:
        # The gateway gives Ray 20 s to answer its cluster probe.
        response = httpx.get(f"{gateway}/health", timeout=40)
    except httpx.HTTPError as error:
        return 0, {"error": str(error)}
    return response.status_code, response.json()


@contextlib.contextmanager
def e2e_cluster(model_builder, *, build_log: Path | None = None) -> Iterator[E2E]:
    """Hosts, engines, builder, the tiny model on the head, and an applier; torn down after."""
    # Short paths: unix sockets (Ray's, containerd's) must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="e2e-", dir="/var/tmp"))
    try:
        # The builder's layers outlive the run: a changed runtime rebuilds only the last layers.
        with engine("e2e-builder", state_dir=CACHE_DIR / "builder", keep_data=True) as builder:
            base_image, base_tag = pinned_base(builder, workdir)
            with docker_hosts(3, workdir=workdir, subnet=SUBNET, prefix="e2e",
                              private_dirs=[HOST_ROOT, "/root/.ssh"]) as cluster:
                head = cluster.hosts[0]
                model_builder(head.private_dirs[HOST_ROOT] / Path(MODEL_SOURCE).relative_to(HOST_ROOT))

                def build_image(context: Path, dockerfile: Path, args: Mapping[str, str]) -> tuple[Path, str]:
                    recipe = ImageRecipe(context, dockerfile, dict(args), aliases={base_image: base_tag})
                    started = time.monotonic()
                    built = build_image_tarball(builder, recipe, log=build_log or workdir / "image-build.log")
                    e2e.image_build_seconds += time.monotonic() - started
                    return built

                site = Site(ssh_config=cluster.sim.ssh_config, workdir=workdir / "apply",
                            build_image=build_image, log=workdir / "apply.log")
                e2e = E2E(cluster, builder, stack_config(cluster, base_image),
                          {"sshPrivateKey": cluster.sim.key.read_text()}, Applier(site), workdir)
                yield e2e
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
