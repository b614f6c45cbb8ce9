"""The e2e applier on its own: translation of declared inputs, ordering, re-apply and destroy."""

from __future__ import annotations

from pathlib import Path

import pulumi
import pytest

from tests.e2e.apply import (
    CONTAINER, LOCAL_COMMAND, REMOTE_COMMAND, Applier, Connection, Site, UnsupportedInput,
    check_command_inputs, container_create_args, deletion_order,
)
from tests.support.pulumi_program import RecordedResource, run_program, stack_config

REPO = Path(__file__).resolve().parents[2]


def _flags(args: list[str]) -> list[tuple[str, str]]:
    return [(args[i], args[i + 1]) for i in range(len(args) - 1) if args[i].startswith("--")]


def test_dcu_container_inputs_become_docker_flags(tmp_path):
    inputs = {
        "name": "vllm-ray-head", "image": "sha256:abc", "command": ["ray", "start", "--head", "--block"],
        "envs": ["HIP_VISIBLE_DEVICES=0,1", "VLLM_HOST_IP=10.0.0.1"],
        "mounts": [{"type": "bind", "source": "/opt/hyhal", "target": "/opt/hyhal", "readOnly": True},
                   {"type": "bind", "source": "/data/models", "target": "/data/models", "readOnly": False}],
        "devices": [{"hostPath": "/dev/kfd"}, {"hostPath": "/dev/dri", "containerPath": "/dev/dri", "permissions": "rwm"}],
        "capabilities": {"adds": ["SYS_PTRACE"]}, "groupAdds": ["video"], "securityOpts": ["seccomp=unconfined"],
        "networkMode": "host", "ipcMode": "host", "pidMode": "host", "shmSize": 65536.0,
        "restart": "unless-stopped", "removeVolumes": False,
    }
    args = container_create_args(inputs, env_file=tmp_path / "env")
    flags = _flags(args)
    for expected in [
        ("--name", "vllm-ray-head"), ("--network", "host"), ("--ipc", "host"), ("--pid", "host"),
        ("--shm-size", "65536m"), ("--restart", "unless-stopped"), ("--group-add", "video"),
        ("--cap-add", "SYS_PTRACE"), ("--security-opt", "seccomp=unconfined"),
        ("--device", "/dev/kfd:/dev/kfd"), ("--device", "/dev/dri:/dev/dri:rwm"),
        ("--mount", "type=bind,target=/opt/hyhal,source=/opt/hyhal,readonly"),
        ("--mount", "type=bind,target=/data/models,source=/data/models"),
        ("--env-file", str(tmp_path / "env")),
    ]:
        assert expected in flags
    assert args[-5:] == ["sha256:abc", "ray", "start", "--head", "--block"]
    # Environment never reaches the command line, where `ps` would show it.
    assert not any("VLLM_HOST_IP" in a for a in args)
    assert (tmp_path / "env").read_text() == "HIP_VISIBLE_DEVICES=0,1\nVLLM_HOST_IP=10.0.0.1\n"
    assert (tmp_path / "env").stat().st_mode & 0o077 == 0


def test_entrypoint_ports_and_on_failure_restart(tmp_path):
    args = container_create_args({
        "name": "c", "image": "img", "entrypoints": ["/bin/sh", "-c"], "command": ["echo hi"],
        "ports": [{"internal": 8000.0, "external": 18000.0, "ip": "127.0.0.1"}, {"internal": 53.0, "protocol": "udp"}],
        "restart": "on-failure", "maxRetryCount": 3.0,
    }, env_file=tmp_path / "env")
    flags = _flags(args)
    assert ("--entrypoint", "/bin/sh") in flags
    assert ("--publish", "127.0.0.1:18000:8000/tcp") in flags and ("--publish", "53/udp") in flags
    assert ("--restart", "on-failure:3") in flags
    assert args[-3:] == ["img", "-c", "echo hi"]


@pytest.mark.parametrize("key,value", [
    ("gpus", "all"), ("start", False), ("networksAdvanced", [{"name": "x"}]), ("uploads", [{"file": "/a"}]),
])
def test_untranslated_container_input_fails_naming_it(tmp_path, key, value):
    with pytest.raises(UnsupportedInput, match=key):
        container_create_args({"name": "c", "image": "img", key: value}, env_file=tmp_path / "env")


def test_untranslated_nested_input_fails_naming_its_path(tmp_path):
    with pytest.raises(UnsupportedInput, match=r"mounts\.volumeOptions"):
        container_create_args({"name": "c", "image": "img", "mounts": [
            {"type": "volume", "target": "/v", "volumeOptions": {"driverName": "x"}}]}, env_file=tmp_path / "env")


def test_remote_command_environment_is_refused_not_dropped():
    with pytest.raises(UnsupportedInput, match="environment"):
        check_command_inputs(REMOTE_COMMAND, "c", {"create": "true", "connection": {"host": "h"},
                                                   "environment": {"TOKEN": "x"}})


def test_connection_becomes_ssh_arguments(tmp_path):
    connection = Connection.from_inputs("c", {"host": "10.0.0.2", "port": 2222.0, "user": "ops",
                                              "privateKey": "KEY", "dialErrorLimit": 3.0, "perDialTimeout": 7.0})
    args = connection.ssh_args(tmp_path / "cfg", tmp_path / "key")
    assert args[-2:] == ["ops@10.0.0.2", "--"]
    assert ["-p", "2222"] == args[args.index("-p"):args.index("-p") + 2]
    assert "ConnectTimeout=7" in args and "ConnectionAttempts=3" in args and str(tmp_path / "key") in args
    assert "KEY" not in args


def _resource(name: str, deps: list[str] = (), parent: str | None = None, custom: bool = True) -> RecordedResource:
    return RecordedResource(urn=f"urn:{name}", type=CONTAINER if custom else "x:index:Comp", name=name, inputs={},
                            parent=f"urn:{parent}" if parent else None, dependencies=[f"urn:{d}" for d in deps],
                            provider=None, custom=custom, retain_on_delete=False)


def test_deletion_order_removes_dependents_first_through_components():
    resources = [
        _resource("head"), _resource("comp", custom=False), _resource("worker", ["head"], parent="comp"),
        _resource("server", ["comp"]), _resource("gateway", ["server"]),
    ]
    order = [r.name for r in deletion_order(resources)]
    assert "comp" not in order
    assert order.index("gateway") < order.index("server") < order.index("worker") < order.index("head")


def _local_command(name: str, create: str, **extra) -> pulumi.runtime.MockResourceArgs:
    return pulumi.runtime.MockResourceArgs(typ=LOCAL_COMMAND, name=name, custom=True,
                                           inputs={"create": create, "interpreter": ["/bin/sh", "-c"], **extra})


def _applier(tmp_path) -> Applier:
    def no_builds(*_):
        raise AssertionError("no image in this test")
    return Applier(Site(ssh_config=tmp_path / "ssh_config", workdir=tmp_path / "apply", build_image=no_builds))


def test_commands_run_for_real_and_reapply_changes_only_what_changed(tmp_path):
    applier = _applier(tmp_path)
    marker = tmp_path / "runs"
    first = _local_command("count", f"echo run >> {marker}; cat", stdin="from stdin", triggers=["a"],
                           delete=f"echo deleted >> {marker}")
    _, outputs = applier.new_resource(first)
    assert outputs["stdout"] == "from stdin"
    assert marker.read_text() == "run\n"

    applier.new_resource(first)  # same inputs: nothing runs again
    assert marker.read_text() == "run\n" and applier.log.actions["count"] == "unchanged"

    changed = _local_command("count", f"echo run >> {marker}; cat", stdin="from stdin", triggers=["b"],
                             delete=f"echo deleted >> {marker}")
    applier.new_resource(changed)  # a new trigger replaces: create the new one, delete the old one
    assert marker.read_text() == "run\nrun\ndeleted\n" and applier.log.actions["count"] == "replaced"

    recorded = RecordedResource(urn="urn:count", type=LOCAL_COMMAND, name="count", inputs={}, parent=None,
                                dependencies=[], provider=None, custom=True, retain_on_delete=False)
    assert applier.destroy(type("Run", (), {"resources": [recorded]})()) == ["count"]
    assert marker.read_text() == "run\nrun\ndeleted\ndeleted\n"


def test_failed_command_fails_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="no such thing"):
        _applier(tmp_path).new_resource(_local_command("bad", "echo no such thing >&2; exit 3"))


@pytest.mark.parametrize("stack_file", ["Pulumi.dev.yaml", "Pulumi.local.yaml"])
def test_every_declaration_of_the_stacks_is_translated(tmp_path, stack_file):
    """What the program declares for the shipped stacks, the applier can apply (or it says what not)."""
    run = run_program(stack_config(REPO / stack_file), secrets={"sshPrivateKey": "KEY"})
    assert run.error is None, run.error
    containers = run.of_type(CONTAINER)
    assert containers
    for resource in containers:
        args = container_create_args(resource.inputs, env_file=tmp_path / "env")
        assert args[args.index(resource.inputs["image"]) + 1:] == resource.inputs["command"]
    for kind in (REMOTE_COMMAND, LOCAL_COMMAND):
        for resource in run.of_type(kind):
            check_command_inputs(kind, resource.name, resource.inputs)
