"""The e2e applier on its own: translation of declared inputs, and the engine's decisions (diff,
replacement, the dependents a delete-before-replace takes, delete order) on hand-made states.
The steps run for real under small programs: test_e2e_applier_steps.py, test_e2e_applier_docker.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.apply import (
    CONTAINER, LOCAL_COMMAND, REMOTE_COMMAND, UNKNOWN, Applied, Connection, UnsupportedInput, check_command_inputs,
    container_create_args, container_update_args, delete_schedule, dependent_replacements, provider_diff,
    with_replace_on_changes,
)
from tests.support.pulumi_program import run_program, stack_config

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


def test_in_place_container_update_becomes_docker_update_flags():
    args = container_update_args({"restart": "on-failure", "maxRetryCount": 2.0, "memory": 512.0, "memorySwap": -1.0,
                                  "cpuShares": 256.0, "cpuSet": "0-3"})
    assert _flags(args) == [("--restart", "on-failure:2"), ("--cpu-shares", "256"), ("--memory", "512m"),
                            ("--memory-swap", "-1"), ("--cpuset-cpus", "0-3")]


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


def _applied(name: str, type_: str = CONTAINER, deps: dict[str, list[str]] | None = None, depends_on=(),
             parent: str | None = None, custom: bool = True, **inputs) -> Applied:
    """A resource of a previous state: `deps` maps an input to the resources its value came from."""
    deps = {key: [f"urn:{d}" for d in names] for key, names in (deps or {}).items()}
    explicit = sorted({u for urns in deps.values() for u in urns} | {f"urn:{d}" for d in depends_on})
    return Applied(urn=f"urn:{name}", type=type_, name=name, id=f"{name}-id", inputs=inputs, outputs={},
                   custom=custom, parent=f"urn:{parent}" if parent else None, dependencies=explicit,
                   property_dependencies=deps)


def test_a_containers_forcenew_inputs_replace_it_deleting_first():
    old = {"name": "c", "image": "img:1", "envs": ["A=1", "B=2"], "restart": "always"}
    replaced = provider_diff(CONTAINER, old, {**old, "image": "img:2"})
    assert replaced.replaces == {"image"} and replaced.delete_before_replace
    # Environment is a set in the docker provider: another order is no change.
    assert not provider_diff(CONTAINER, old, {**old, "envs": ["B=2", "A=1"]}).changed
    assert provider_diff(CONTAINER, old, {**old, "envs": ["A=1", "B=3"]}).replaces == {"envs"}


@pytest.mark.parametrize("key,value", [
    ("restart", "no"), ("memory", 512.0), ("healthcheck", {"tests": ["CMD", "true"]}), ("destroyGraceSeconds", 30.0),
])
def test_a_containers_other_inputs_update_it_in_place(key, value):
    old = {"name": "c", "image": "img:1", "restart": "always"}
    diff = provider_diff(CONTAINER, old, {**old, key: value})
    assert diff.changed == {key} and not diff.replaces and not diff.delete_before_replace


def test_only_a_commands_triggers_replace_it_and_never_delete_first():
    old = {"create": "a", "triggers": ["x"], "connection": {"host": "10.0.0.1"}}
    assert provider_diff(REMOTE_COMMAND, old, {**old, "triggers": ["y"]}).replaces == {"triggers"}
    for key, value in (("create", "b"), ("connection", {"host": "10.0.0.2"}), ("delete", "rm x")):
        diff = provider_diff(REMOTE_COMMAND, old, {**old, key: value})
        assert diff.changed == {key} and not diff.replaces
    unknown = provider_diff(LOCAL_COMMAND, old, {**old, "triggers": UNKNOWN})
    assert unknown.replaces == {"triggers"} and not unknown.delete_before_replace


def test_replace_on_changes_turns_a_change_under_its_path_into_a_replacement():
    old = {"create": "a", "triggers": ["x"]}
    diff = provider_diff(LOCAL_COMMAND, old, {"create": "b", "triggers": ["x"]})
    assert not with_replace_on_changes(diff, ["triggers[*]"]).replaces
    assert with_replace_on_changes(diff, ["create"]).replaces == {"create"}
    assert with_replace_on_changes(diff, ["*"]).replaces == {"create"}


def test_a_delete_before_replace_takes_the_dependents_it_would_replace():
    graph = [
        _applied("a", image="i"),
        _applied("gate-a", REMOTE_COMMAND, deps={"triggers": ["a"]}, triggers=["a-id"], create="wait"),
        _applied("reader", REMOTE_COMMAND, deps={"create": ["a"]}, create="cat a-id"),  # updated, not replaced
        _applied("b", depends_on=["gate-a"], image="i"),  # after gate-a, but nothing of a flows into it
        _applied("gate-b", REMOTE_COMMAND, deps={"triggers": ["b"]}, triggers=["b-id"]),
        _applied("sidecar", deps={"envs": ["a"]}, envs=["A=a-id"], image="i"),  # ForceNew input from a
        _applied("sidecar-gate", REMOTE_COMMAND, deps={"triggers": ["sidecar"]}, triggers=["sidecar-id"]),
    ]
    found = dependent_replacements(graph, graph[0], registered={"urn:a"})
    assert [r.name for r in found] == ["gate-a", "sidecar", "sidecar-gate"]
    # One registered in this apply already no longer depends on it.
    assert [r.name for r in dependent_replacements(graph, graph[0], {"urn:a", "urn:sidecar"})] == ["gate-a"]


def test_deletes_run_in_antichains_dependents_first_through_components():
    graph = [
        _applied("head"), _applied("comp", custom=False), _applied("worker", depends_on=["head"], parent="comp"),
        _applied("server", depends_on=["comp"]), _applied("gateway", depends_on=["server"]),
        _applied("key", REMOTE_COMMAND),
    ]
    schedule = [sorted(r.name for r in antichain) for antichain in delete_schedule(graph, graph)]
    # Each goes in the antichain of its longest chain of dependencies, as the engine schedules it.
    assert schedule == [["gateway"], ["server"], ["worker"], ["comp", "head", "key"]]
    # Only direct dependencies among the condemned order them (DependenciesOf, not its closure).
    assert [sorted(r.name for r in a) for a in delete_schedule(graph, [graph[0], graph[4]])] == [["gateway", "head"]]
    # A dependency on a component is one on its children before it.
    assert [sorted(r.name for r in a) for a in delete_schedule(graph, [graph[2], graph[3]])] == [["server"], ["worker"]]


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
