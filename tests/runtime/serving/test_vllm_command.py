import json
import sys

import pytest

from node_runtime.serving.cluster import ClusterState
from node_runtime.serving.launcher import (
    LaunchError, build_vllm_command, check_heads, check_layout, check_port, installed_vllm_version, request_log_flags,
    vllm_environment,
)
from node_runtime.serving.spec import ServeSpec

from .test_spec import CONTRACT_SERVE


def _spec(**changes) -> ServeSpec:
    return ServeSpec.model_validate({**json.loads(CONTRACT_SERVE), **changes})


def _flags(command: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in zip(command, command[1:]) if flag.startswith("--") and not value.startswith("--")}


_CPU = dict(accelerator="cpu", tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend=None)


def test_dcu_command_line():
    command = build_vllm_command(_spec(max_model_len=8192, extra_args=["--enforce-eager"]), "awq",
                                 vllm_version="0.18.1", python="/usr/bin/python3")
    assert command[:3] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flags(command) == {
        "--model": "/data/models/Llama-3-8B-Instruct", "--served-model-name": "Llama-3-8B-Instruct",
        "--host": "127.0.0.1", "--port": "8100", "--tensor-parallel-size": "8", "--pipeline-parallel-size": "3",
        "--dtype": "auto", "--max-num-seqs": "256", "--gpu-memory-utilization": "0.9", "--max-model-len": "8192",
        "--quantization": "awq", "--distributed-executor-backend": "ray",
    }
    assert command[-1] == "--enforce-eager"


def test_cpu_command_line_leaves_out_ray_and_unset_options():
    command = build_vllm_command(_spec(**_CPU), None, vllm_version="0.32.0")
    assert command[0] == sys.executable
    flags = _flags(command)
    for absent in ("--distributed-executor-backend", "--quantization", "--max-model-len", "--max-num-batched-tokens"):
        assert absent not in flags
    # Flags whose name changed across vLLM 0.8.5 .. 0.32 must never appear.
    assert not {"--disable-log-requests", "--enable-log-requests", "--device"} & set(command)


def test_ray_executor_gets_the_cluster_address():
    spec = _spec()
    assert vllm_environment(spec, {"PATH": "/bin"}) == {"PATH": "/bin", "RAY_ADDRESS": "10.0.0.1:6379"}
    assert "RAY_ADDRESS" not in vllm_environment(_spec(**_CPU), {})


def test_the_planned_layout_is_checked_against_ray():
    check_layout(_spec(), ClusterState(nodes=3, gpus=24), {})
    check_layout(_spec(**_CPU), None, {})  # vLLM's own executor on CPU: no devices to count
    with pytest.raises(LaunchError, match=r"TP 8 x PP 3 = 24 GPUs, but Ray reports 16"):
        check_layout(_spec(), ClusterState(nodes=2, gpus=16), {})


def test_a_single_node_replica_needs_its_devices_in_view():
    mp = _spec(tensor_parallel_size=4, pipeline_parallel_size=1, distributed_executor_backend="mp", cluster=None)
    check_layout(mp, None, {"HIP_VISIBLE_DEVICES": "4,5,6,7"})
    with pytest.raises(LaunchError, match=r"4 devices, but this container sees 2 \(HIP_VISIBLE_DEVICES='4,5'\)"):
        check_layout(mp, None, {"HIP_VISIBLE_DEVICES": "4,5"})


def test_a_taken_port_is_named():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(LaunchError, match=rf"cannot listen on 127.0.0.1:{port} for Llama-3-8B-Instruct .*another port"):
            check_port(_spec(port=port))
    check_port(_spec(port=port))  # free again


def test_tp_must_divide_the_attention_heads():
    check_heads(_spec(), {"num_attention_heads": 64})
    check_heads(_spec(), {})  # unknown: vLLM's own check remains
    with pytest.raises(LaunchError, match=r"tensorParallelSize 8 does not divide the 28 attention heads .*1, 2, 4, 7, 14, 28"):
        check_heads(_spec(), {"num_attention_heads": 28})


def test_request_logging_flag_follows_the_vllm_version():
    assert request_log_flags("0.8.5") == ["--disable-log-requests"]
    assert request_log_flags("0.9.2+das.opt1.dtk2504") == ["--disable-log-requests"]
    assert request_log_flags("0.10.0") == ["--disable-log-requests"]
    for newer in ("0.10.1", "0.11.0", "0.18.1", "0.32.0", None, "unknown"):
        assert request_log_flags(newer) == []
    old = build_vllm_command(_spec(extra_args=["--enforce-eager"]), None, vllm_version="0.8.5")
    assert old[-2:] == ["--disable-log-requests", "--enforce-eager"]  # extra_args last: the user has the final word


def test_installed_vllm_version_is_found_without_importing_vllm():
    assert installed_vllm_version() == "0.32.0"  # the CPU build the suite installs (requirements-test.txt)


def test_blue_green_copies_take_different_slots(tmp_path, monkeypatch):
    """A new copy takes the slot the running one does not hold; with both held, a clear refusal."""
    from node_runtime.serving import launcher

    monkeypatch.setattr(launcher, "SERVING_URL_FILE", str(tmp_path / "url"))
    spec = _spec(tensor_parallel_size=4, pipeline_parallel_size=1, distributed_executor_backend="mp", cluster=None,
                 slots=[{"devices": [0, 1, 2, 3], "port": 8100}, {"devices": [4, 5, 6, 7], "port": 8200}],
                 slot_lock_dir=str(tmp_path / "slots"))
    first_env, second_env = {"HIP_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, {"HIP_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    first = launcher.take_slot(spec, first_env)
    assert (first.port, first_env["HIP_VISIBLE_DEVICES"]) == (8100, "0,1,2,3")
    second = launcher.take_slot(spec, second_env)  # the first copy still runs (its lock is held)
    assert (second.port, second_env["HIP_VISIBLE_DEVICES"]) == (8200, "4,5,6,7")
    assert (tmp_path / "url").read_text() == "http://127.0.0.1:8200\n"
    with pytest.raises(LaunchError, match="every blue-green slot of Llama-3-8B-Instruct is held"):
        launcher.take_slot(spec, {})
    with pytest.raises(ValueError, match="slots and slot_lock_dir"):
        _spec(slots=spec.model_dump()["slots"])
