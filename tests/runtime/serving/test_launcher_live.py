"""`node-runtime serve` and `node-runtime cluster wait` failing for real, each with a message that says what to do."""

import json
import os
import shutil
import subprocess

import pytest

from tests.support.processes import BIN, serve_spec

pytestmark = pytest.mark.slow


def _run(argv, env_extra=None, timeout=120):
    env = {key: value for key, value in os.environ.items() if not key.startswith("NODE_RUNTIME_")}
    env.update(env_extra or {})
    return subprocess.run([str(BIN / "node-runtime"), *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_cluster_wait_ready(ray_head):
    done = _run(["cluster", "wait", "--address", ray_head, "--nodes", "1", "--gpus", "0", "--timeout", "60"])
    assert done.returncode == 0, done.stderr
    assert "ready: 1 nodes, 0 GPUs" in done.stdout


def test_cluster_wait_names_what_is_missing(ray_head):
    done = _run(["cluster", "wait", "--address", ray_head, "--nodes", "2", "--gpus", "8", "--timeout", "5"])
    assert done.returncode == 1
    assert "1 of 2 nodes alive, 0 of 8 GPUs" in done.stderr and "Traceback" not in done.stderr


def test_cluster_wait_bad_usage():
    done = _run(["cluster", "wait", "--address", "no-port", "--nodes", "1", "--timeout", "5"])
    assert done.returncode == 2 and "ray_address" in done.stderr


def _serve(spec: dict, timeout=120):
    return _run(["serve"], {"NODE_RUNTIME_SERVE_SPEC": json.dumps(spec)}, timeout)


def test_serve_without_spec_is_bad_usage():
    done = _run(["serve"])
    assert done.returncode == 2 and "NODE_RUNTIME_SERVE_SPEC is not set" in done.stderr


def test_serve_names_an_unknown_field(tiny_model, ray_head):
    spec = serve_spec(tiny_model, "m", 1, ray_head, tensor_paralel_size=2)
    done = _serve(spec)
    assert done.returncode == 2 and "tensor_paralel_size: unknown field" in done.stderr


def test_serve_refuses_a_model_without_manifest(tiny_model, ray_head, work_dir):
    partial = work_dir / "models" / "partial"
    shutil.copytree(tiny_model, partial, ignore=shutil.ignore_patterns(".manifest.json"))
    done = _serve(serve_spec(partial, "partial", 1, ray_head))
    assert done.returncode == 1, done.stderr
    assert f"model {partial} is incomplete" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_int4_on_an_unquantized_checkpoint(tiny_model, ray_head):
    done = _serve(serve_spec(tiny_model, "m", 1, ray_head, quantization="int4"))
    assert done.returncode == 1
    assert "'int4' needs a checkpoint quantized to 4 bits" in done.stderr


def test_serve_waits_for_the_cluster_then_gives_up(tiny_model, ray_head):
    spec = serve_spec(tiny_model, "m", 1, ray_head)
    # Long enough for one probe (a Ray driver start) to finish even on a loaded machine.
    spec["cluster"] = {**spec["cluster"], "expected_nodes": 2, "timeout_s": 20}
    done = _serve(spec)
    assert done.returncode == 1
    assert "not ready after 20s: 1 of 2 nodes alive" in done.stderr, done.stderr[-3000:]
