"""The e2e cluster: three simulated hosts with Docker engines, the builder engine for the node
image, the stack config the program is run with, and what the checks need to reach it.

Shared by tests/e2e/test_e2e_cluster.py and bench/e2e/bench_e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx

from tests.e2e.apply import Applier, Site
from tests.e2e.node_image import CACHE_DIR, ImageRecipe, build_image_tarball, pinned_base
from tests.support.docker_hosts import DockerCluster, DockerEngine, docker_hosts, engine, remove_in_background
from tests.support.waiting import wait_until as _wait_until

# Override when another simulated cluster holds it on this machine (CI runs nothing else).
SUBNET = os.environ.get("E2E_SUBNET", "10.78.0.0/24")
HOST_ROOT = "/srv/vllm-e2e"  # private on every host: the models and data roots live under it
MODEL_ROOT = f"{HOST_ROOT}/models"
DATA_ROOT = f"{HOST_ROOT}/data"
MODEL_SOURCE = f"{HOST_ROOT}/src/tiny-llama"  # on the head only: the model the stack adopts
MODEL_NAME = "tiny-llama"
CLUSTER_NAME = "e2e"
REPLICAS = 3


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
        "timeouts": {"clusterReady": 300, "serverReady": 600, "drain": 60},
        "gatewayWorkers": 2,  # the multi-process gateway a DCU head runs: its container stops, restarts and serves alike
        # The three "hosts" share this machine's two cores; separate machines would not. vLLM's CPU build
        # binds each engine's worker to the cores left after one it reserves (the same core for every
        # replica here) and spins its OpenMP threads: one unbound thread each instead. And it runs the
        # model in a worker process of its own, fed through a shared-memory queue whose readers poll with
        # sched_yield for a second after every read (shm_broadcast.py): with three engines on two cores,
        # whichever is busy kept the cores and the others stalled for seconds (measured alone, the replicas
        # served alike; together 1220 / 272 / 435 requests in 30 s). Without V1 multiprocessing the model
        # runs in the engine process itself, and together they served 1319 / 1253 / 1239.
        "extraEnv": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "models": [{
            "id": f"local/{MODEL_NAME}", "source": "local", "localPath": MODEL_SOURCE,
            "replicas": REPLICAS,  # one per host (CPU: no devices; replica r on node r)
            "maxNumSeqs": 4, "maxModelLen": 256, "dtype": "float32", "extraArgs": ["--enforce-eager"],
            # On CPU this is the share of the machine's memory vLLM reserves for its KV cache: 0.9 would
            # not start beside the rest of the cluster on one machine, and the tiny model's 4 x 256 tokens
            # need a few MB: 0.04 (about 1 GB here) keeps three replicas and a rolling copy well inside it.
            "gpuMemoryUtilization": 0.04,
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


def wait_until(predicate, *, timeout: float, interval: float = 2.0, what: str, process=None) -> Any:
    """tests.support.waiting.wait_until, polling every 2 s by default (the cluster's steps are slow)."""
    return _wait_until(predicate, timeout=timeout, interval=interval, what=what, process=process)


def generate(gateway: str, prompt: str, max_tokens: int) -> dict | None:
    """The guide's /generate; None while the gateway cannot answer it."""
    try:
        response = httpx.post(f"{gateway}/generate", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=120)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


@dataclass
class Outcome:
    kind: str  # "generate" (one JSON answer) or "stream" (SSE)
    started: float
    seconds: float
    error: str | None  # None: a complete, well-formed answer


class Load:
    """Clients sending requests through the gateway until stopped, every outcome kept: `threads`
    non-streaming /generate loops, and `streams` streaming /v1/completions loops."""

    def __init__(self, gateway: str, *, threads: int = 3, streams: int = 0, max_tokens: int = 8):
        self.gateway, self.max_tokens = gateway, max_tokens
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=("generate",), daemon=True) for _ in range(threads)]
        self._threads += [threading.Thread(target=self._loop, args=("stream",), daemon=True) for _ in range(streams)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def failures(self, kind: str | None = None) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.error and (kind is None or o.kind == kind)]

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if kind is None or o.kind == kind)

    def _loop(self, kind: str) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    error = self._generate(client) if kind == "generate" else self._stream(client)
                except httpx.HTTPError as failed:
                    error = f"{type(failed).__name__}: {failed}"
                with self._lock:
                    self.outcomes.append(Outcome(kind, started, time.monotonic() - started, error))

    def _generate(self, client: httpx.Client) -> str | None:
        response = client.post(f"{self.gateway}/generate", json={"prompt": "Hello", "max_tokens": self.max_tokens})
        if response.status_code != 200:
            return f"{response.status_code}: {response.text[:300]}"
        return None if response.json()["usage"]["completion_tokens"] >= 1 else "no tokens"

    def _stream(self, client: httpx.Client) -> str | None:
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": self.max_tokens, "stream": True}
        with client.stream("POST", f"{self.gateway}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return f"{response.status_code}: {response.read()[:300]!r}"
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        # A stream is complete only with its final [DONE] event: one cut short is a failure.
        return None if events and events[-1] == "data: [DONE]" else f"stream cut after {len(events)} events"


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
        remove_in_background(workdir)
