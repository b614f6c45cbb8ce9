"""Real processes for the serving tests and the gateway benchmark: a Ray head, `node-runtime serve`, the gateway.

Each is started in its own session and stopped by its own process group, never by name, so other
people's Ray or vLLM on the same machine are left alone.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


_on_start: list[Callable[["Process"], None]] = []


@contextmanager
def each_started(callback: Callable[["Process"], None]) -> Iterator[None]:
    """callback(process) for every Process started inside the block, as soon as it has started: the
    start_* helpers below start a process and then wait for it to answer, so one whose wait fails never
    reaches their caller, who could otherwise not stop it."""
    _on_start.append(callback)
    try:
        yield
    finally:
        _on_start.remove(callback)


class Process:
    """A child in its own session, with its output in a log file for failure messages."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        for callback in list(_on_start):
            callback(self)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready, timeout: float) -> None:
        """Until ready() holds; an error with this process's exit code and log tail as soon as it exits."""
        wait_until(ready, timeout=timeout, what=f"{self.name} ready", interval=0.5, process=self)

    def stop(self, grace: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def eventually(probe, *, timeout: float, what: str, interval: float = 0.2):
    """probe()'s first truthy value, polled for `timeout` seconds; else an error with its last value."""
    return wait_until(probe, timeout=timeout, what=what, interval=interval)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_ray_head(work: Path) -> tuple[Process, str]:
    """A one-node Ray head with every port of its own; returns (process, GCS address)."""
    gcs, node_manager, object_manager, agent_listen, agent_grpc, metrics, runtime_env, client = free_ports(8)
    temp_dir = work / "ray"  # Ray's socket paths must stay short: keep `work` shallow
    # free_ports() draws from the kernel's ephemeral range: the worker ports (100, one range per test
    # run, picked by pid) stay below it, or Ray refuses a range holding another of its ports.
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker_low = 20000 + os.getpid() % ((ephemeral_low - 20000) // 100) * 100
    argv = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        "--include-dashboard=false", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
        f"--min-worker-port={worker_low}", f"--max-worker-port={worker_low + 99}",
        f"--temp-dir={temp_dir}", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = Process("ray-head", argv, env, work)
    head.start()
    address = f"127.0.0.1:{gcs}"
    from node_runtime.serving.cluster import ClusterUnreachable, probe

    def answers() -> bool:
        try:
            return probe(address, timeout=20).nodes >= 1
        except ClusterUnreachable:
            return False

    head.wait_until(answers, timeout=120)
    return head, address


def cluster_json(address: str, nodes: int = 1, timeout_s: float = 60) -> dict:
    return {"ray_address": address, "expected_nodes": nodes, "expected_gpus": 0, "timeout_s": timeout_s}


def serve_spec(model_dir: Path, name: str, port: int, ray_address: str, **overrides) -> dict:
    spec = {
        "served_model_name": name, "model_path": str(model_dir), "host": "127.0.0.1", "port": port,
        "accelerator": "cpu", "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "quantization": "none",
        "dtype": "float32", "max_num_seqs": 32, "max_num_batched_tokens": None, "max_model_len": 512,
        "gpu_memory_utilization": 0.9, "extra_args": ["--enforce-eager"], "cluster": cluster_json(ray_address),
    }
    return {**spec, **overrides}


def vllm_env(work: Path) -> dict[str, str]:
    """vLLM's caches and IPC sockets in our own directory; a small KV cache for a small machine."""
    for sub in ("vllm-cache", "vllm-rpc"):
        (work / sub).mkdir(exist_ok=True)
    return {**os.environ, "VLLM_CACHE_ROOT": str(work / "vllm-cache"), "VLLM_RPC_BASE_PATH": str(work / "vllm-rpc"),
            "VLLM_CPU_KVCACHE_SPACE": "1"}


def start_model_server(spec: dict, work: Path, timeout: float = 400, api_key: str | None = None) -> Process:
    """`node-runtime serve` for real: the launcher's checks, then vLLM's CPU build (with `api_key`, the
    key vLLM then requires on /v1, as the program runs replicas off the head)."""
    env = {**vllm_env(work), "NODE_RUNTIME_SERVE_SPEC": json.dumps(spec)}
    if api_key:
        env["VLLM_API_KEY"] = api_key
    server = Process(f"vllm-{spec['port']}", [str(BIN / "node-runtime"), "serve"], env, work)
    server.start()
    server.wait_until(lambda: http_ok(f"http://127.0.0.1:{spec['port']}/health"), timeout)
    return server


def gateway_config(port: int, models: list[str], routes_dir: Path, ray_address: str, **overrides) -> dict:
    """NODE_RUNTIME_GATEWAY_CONFIG as the program writes it (docs/runtime-contract.md)."""
    return {"host": "127.0.0.1", "port": port, "models": models, "routes_dir": str(routes_dir),
            "cluster": cluster_json(ray_address), **overrides}


def route_path(routes_dir: Path, replica: str) -> Path:
    return routes_dir / f"{replica.replace('/', '-')}.json"


def write_route(routes_dir: Path, model: str, replica: str, url: str, node: str = "node-0") -> Path:
    """A replica's route file as the program writes it: whole, renamed from a name the gateway ignores."""
    path = route_path(routes_dir, replica)
    temporary = path.with_name(f".{path.stem}.tmp")
    temporary.write_text(json.dumps({"model": model, "replica": replica, "url": url, "node": node}))
    temporary.rename(path)
    return path


def start_gateway(config: dict, work: Path, api_key: str | None, internal_key: str | None = None,
                  api_keys: dict[str, str] | None = None) -> Process:
    """`api_keys`: the named keys' secrets (name -> secret) of the config's `api_keys`."""
    env = {**os.environ, "NODE_RUNTIME_GATEWAY_CONFIG": json.dumps(config)}
    for variable, key in (("NODE_RUNTIME_API_KEY", api_key), ("NODE_RUNTIME_INTERNAL_KEY", internal_key),
                          ("NODE_RUNTIME_API_KEYS", json.dumps(api_keys) if api_keys else None)):
        env.pop(variable, None)
        if key:
            env[variable] = key
    gateway = Process(f"gateway-{config['port']}", [str(BIN / "node-runtime"), "gateway"], env, work)
    gateway.start()
    gateway.wait_until(lambda: answers(f"http://127.0.0.1:{config['port']}/v1/models"), 60)
    return gateway


class ThreadServer:
    """An ASGI app on uvicorn in a thread of the test process, for servers the tests shape themselves."""

    def __init__(self, app, port: int, ready_path: str):
        import threading

        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started and answers(self.url + ready_path), timeout=10, interval=0.1,
                   what=f"in-thread server on port {port} answering {ready_path}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def answers(url: str) -> bool:
    """Any HTTP answer at all (a 401 included): the server is listening."""
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def metric_families(url: str) -> dict:
    """The Prometheus families a server's /metrics shows, by name."""
    return {family.name: family for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text)}


def metric_values(url: str, family: str, endpoint: str) -> list[float]:
    """The values of one family's series for one endpoint (its `_created` timestamps left out)."""
    return [sample.value for sample in metric_families(url)[family].samples
            if sample.labels["endpoint"] == endpoint and not sample.name.endswith("_created")]


def gateway_workers(gateway_pid: int) -> list[psutil.Process]:
    """A gateway's live uvicorn workers (not its multiprocessing resource tracker, nor a dead worker)."""
    workers = []
    for child in psutil.Process(gateway_pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return workers


@contextmanager
def paused(worker: psutil.Process):
    """The other workers accept every new connection meanwhile (keep it well within uvicorn's 5 s health check)."""
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def _metrics_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("gateway-metrics-*"))


@contextmanager
def gateway_with_two_workers(models: list[str], routes_dir: Path, ray_address: str, work: Path,
                             internal_key: str | None = None):
    """`node-runtime gateway` with `workers: 2`, as the container runs it: (its url, its process).

    Its log's tail is printed when it stops (pytest shows it for a failed test); once stopped, its
    workers' metrics directory must be gone.
    """
    dirs_before = _metrics_dirs()
    port = free_ports(1)[0]
    config = gateway_config(port, models, routes_dir, ray_address, workers=2)
    process = start_gateway(config, work, api_key=None, internal_key=internal_key)
    try:
        assert len(gateway_workers(process.proc.pid)) == 2
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.stop()
        print(f"gateway log:\n{process.tail(60)}")
    assert _metrics_dirs() == dirs_before, "the workers' metrics directory outlived the gateway"


def vllm_work(url: str) -> tuple[float, float]:
    """(tokens generated so far, requests run to their end so far) by a vLLM server, from its own /metrics."""
    families = metric_families(url)
    tokens = sum(sample.value for sample in families["vllm:generation_tokens"].samples if sample.name.endswith("_total"))
    # An aborted request may be counted here too, with finished_reason "abort", depending on when the abort lands.
    finished = sum(sample.value for sample in families["vllm:request_success"].samples
                   if sample.name.endswith("_total") and sample.labels.get("finished_reason") != "abort")
    return tokens, finished


def wait_until_vllm_idle(url: str, timeout: float = 60) -> None:
    """No request running or waiting in a vLLM server (an earlier test's may still be finishing)."""
    def idle() -> bool:
        families = metric_families(url)
        return sum(sample.value for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
                   for sample in families[name].samples) == 0

    eventually(idle, timeout=timeout, what="vLLM idle after earlier requests", interval=0.25)


def vllm_work_settled(url: str) -> list[tuple[float, float]]:
    """vllm_work() every 0.25 s until it has not moved for a second: the readings, the settled one last."""
    readings = [vllm_work(url)]
    while len(readings) < 5 or readings[-1] != readings[-5]:
        time.sleep(0.25)
        readings.append(vllm_work(url))
    return readings

