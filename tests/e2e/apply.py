"""Apply what the Pulumi program declares to real hosts: the e2e stand-in for `pulumi up` and
`pulumi destroy`, since the Pulumi CLI and the docker/command provider plugins cannot run here.

The real program runs under Pulumi's mocks (tests/support/pulumi_program.py), with mocks that
*are* the providers: each resource the program registers is created for real when Pulumi's SDK
registers it, and its real outputs (a command's stdout, a container's id) flow back into the
program, exactly as a provider's would. The SDK registers a resource only once everything it
depends on has been registered (its inputs resolved, its `depends_on` created), so this is
Pulumi's own dependency order, parallelism included.

Per resource type:
- `pulumi:providers:docker`: remembered; resources naming it reach its `host` (ssh://user@ip:port).
- `docker:index/container:Container`: every declared input translated into `docker create`
  flags (see `container_create_args`), run against the engine of the provider it names; any
  input not translated fails loudly, so a new declaration cannot be ignored silently.
- `command:remote:Command`: its `create` run over ssh on the host its `connection` names, with
  its `stdin`; `command:local:Command`: run here.
- `docker:index/image:Image`: built once on the e2e builder engine (cached, see node_image.py)
  and loaded on the engine of the provider it names, under its declared name.

A later apply does what the engine (pulumi/pulumi pkg/resource/deploy/step_generator.go) does
with what each provider's Diff answers (`provider_diff`):
- no change: `same`, the applied outputs kept; a change that the provider applies in place:
  `update` (a command runs its `update`, else its `create`, again; a container takes
  `docker update`, or nothing for attributes the docker provider keeps in its state only);
- a change that forces a replacement: the new resource is created first (`create-replacement`)
  and the old one deleted at the end of the apply (`delete-replaced`), unless the replacement
  is delete-before-replace: the provider asks for it (pulumi-docker's Container, whose `name`
  cannot exist twice), or the program's `delete_before_replace` says so (it wins either way).
  Then the dependents the replacement replaces too (an input of theirs comes from the resource,
  and their provider's Diff replaces them for it: a command whose `triggers` hold the container's
  id) are deleted first, dependents before what they depend on, then the resource, then its
  replacement is created; those dependents are created again when the program registers them;
- at the end of a successful apply, the copies it replaced and the resources the program no
  longer registers are deleted in antichains of the previous apply's dependency graph (each
  resource after everything that depended on it; one antichain's deletes run in parallel).
  A failed apply deletes nothing at the end: its replaced copies are deleted by the next one.
`destroy` deletes everything applied the same way; `retain_on_delete` keeps a resource on its
host. Every step is recorded, in the order the steps finished, in `Applier.log` (an ApplyLog).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import secrets
import shlex
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pulumi

from tests.support.pulumi_program import REPO, ProgramRun, RecordedResource, current_registration, run_program
from tests.support.pulumi_program import _unwrap_secrets as unwrap_secrets

PROVIDER = "pulumi:providers:docker"
CONTAINER = "docker:index/container:Container"
IMAGE = "docker:index/image:Image"
REMOTE_COMMAND = "command:remote:Command"
LOCAL_COMMAND = "command:local:Command"


class UnsupportedInput(ValueError):
    """A declared input the applier does not translate: extend the applier, never drop it."""


class ApplyError(RuntimeError):
    pass


def _number(value: Any) -> int:
    # Pulumi's wire format carries every number as a float.
    if isinstance(value, float) and not value.is_integer():
        raise UnsupportedInput(f"expected a whole number, got {value}")
    return int(value)


def _is_unset(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


def _reject_unknown(kind: str, name: str, inputs: Mapping[str, Any], known: Iterable[str], path: str = "") -> None:
    unknown = sorted(k for k, v in inputs.items() if k not in set(known) and not _is_unset(v))
    if unknown:
        where = f"{path}." if path else ""
        raise UnsupportedInput(
            f"{kind} {name!r} declares {', '.join(where + k for k in unknown)}, which the e2e applier "
            "does not translate: add it to tests/e2e/apply.py"
        )


# --- docker:index/container:Container -----------------------------------------------------------

_CONTAINER_KEYS = {
    "name", "image", "command", "entrypoints", "envs", "mounts", "volumes", "devices", "capabilities",
    "networkMode", "ipcMode", "pidMode", "shmSize", "restart", "maxRetryCount", "groupAdds",
    "securityOpts", "ports", "labels", "hostname", "user", "workingDir", "privileged", "init",
    "readOnly", "stopSignal", "stopTimeout", "ulimits", "memory", "memorySwap", "cpuShares", "cpuSet",
    "tmpfs", "sysctls", "hosts", "dns", "logDriver", "logOpts", "healthcheck", "runtime",
    # resource-level behaviour, not `docker create` flags
    "removeVolumes", "mustRun", "start", "destroyGraceSeconds",
}


def container_create_args(inputs: Mapping[str, Any], *, env_file: Path) -> list[str]:
    """`docker create` arguments for a Container's declared inputs (Pulumi wire names).

    Environment goes to `env_file` (written here, mode 0600) rather than the command line, where
    `ps` would show secrets such as the API key. Raises UnsupportedInput for anything else.
    """
    name = inputs.get("name") or "<unnamed>"
    _reject_unknown("Container", name, inputs, _CONTAINER_KEYS)
    if not inputs.get("image"):
        raise UnsupportedInput(f"Container {name!r} declares no image")
    if inputs.get("start") is False:
        raise UnsupportedInput(f"Container {name!r} declares start: false, which the e2e applier does not translate")
    args: list[str] = []
    flag = lambda option, value: args.extend([option, str(value)])  # noqa: E731

    if inputs.get("name"):
        flag("--name", inputs["name"])
    envs = list(inputs.get("envs") or [])
    bad = [e.split("=", 1)[0] for e in envs if "\n" in e or "=" not in e]
    if bad:
        raise UnsupportedInput(f"Container {name!r}: env entries {bad} are not single-line NAME=value")
    env_file.write_text("".join(f"{e}\n" for e in envs))
    env_file.chmod(0o600)
    if envs:
        flag("--env-file", env_file)
    for mount in inputs.get("mounts") or []:
        flag("--mount", _mount_flag(name, mount))
    for volume in inputs.get("volumes") or []:
        _reject_unknown("Container", name, volume, {"hostPath", "containerPath", "readOnly", "volumeName"}, "volumes")
        source = volume.get("hostPath") or volume.get("volumeName")
        spec = f"{source}:{volume['containerPath']}" if source else volume["containerPath"]
        flag("--volume", spec + (":ro" if volume.get("readOnly") else ""))
    for device in inputs.get("devices") or []:
        _reject_unknown("Container", name, device, {"hostPath", "containerPath", "permissions"}, "devices")
        spec = device["hostPath"] + ":" + (device.get("containerPath") or device["hostPath"])
        flag("--device", spec + (":" + device["permissions"] if device.get("permissions") else ""))
    capabilities = inputs.get("capabilities") or {}
    _reject_unknown("Container", name, capabilities, {"adds", "drops"}, "capabilities")
    for cap in capabilities.get("adds") or []:
        flag("--cap-add", cap)
    for cap in capabilities.get("drops") or []:
        flag("--cap-drop", cap)
    for key, option in (("networkMode", "--network"), ("ipcMode", "--ipc"), ("pidMode", "--pid"),
                        ("hostname", "--hostname"), ("user", "--user"), ("workingDir", "--workdir"),
                        ("stopSignal", "--stop-signal"), ("cpuSet", "--cpuset-cpus"), ("runtime", "--runtime"),
                        ("logDriver", "--log-driver")):
        if not _is_unset(inputs.get(key)):
            flag(option, inputs[key])
    for key, option, unit in (("shmSize", "--shm-size", "m"), ("memory", "--memory", "m"),
                              ("memorySwap", "--memory-swap", "m"), ("cpuShares", "--cpu-shares", ""),
                              ("stopTimeout", "--stop-timeout", "")):
        if inputs.get(key) is not None:
            flag(option, f"{_number(inputs[key])}{unit}")
    if inputs.get("restart"):
        flag("--restart", _restart_policy(inputs))
    for group in inputs.get("groupAdds") or []:
        flag("--group-add", group)
    for option in inputs.get("securityOpts") or []:
        flag("--security-opt", option)
    for port in inputs.get("ports") or []:
        _reject_unknown("Container", name, port, {"internal", "external", "ip", "protocol"}, "ports")
        published = ":".join(str(p) for p in (port.get("ip"), port.get("external") and _number(port["external"])) if p)
        target = f"{_number(port['internal'])}/{port.get('protocol') or 'tcp'}"
        flag("--publish", f"{published}:{target}" if published else target)
    for label in inputs.get("labels") or []:
        flag("--label", f"{label['label']}={label['value']}")
    for key, value in (inputs.get("logOpts") or {}).items():
        flag("--log-opt", f"{key}={value}")
    for key, value in (inputs.get("sysctls") or {}).items():
        flag("--sysctl", f"{key}={value}")
    for target, options in (inputs.get("tmpfs") or {}).items():
        flag("--tmpfs", f"{target}:{options}" if options else target)
    for host in inputs.get("hosts") or []:
        flag("--add-host", f"{host['host']}:{host['ip']}")
    for server in inputs.get("dns") or []:
        flag("--dns", server)
    for ulimit in inputs.get("ulimits") or []:
        flag("--ulimit", f"{ulimit['name']}={_number(ulimit['soft'])}:{_number(ulimit['hard'])}")
    if inputs.get("healthcheck"):
        args.extend(_healthcheck_flags(name, inputs["healthcheck"]))
    for key, option in (("privileged", "--privileged"), ("init", "--init"), ("readOnly", "--read-only")):
        if inputs.get(key):
            args.append(option)
    entrypoint = list(inputs.get("entrypoints") or [])
    if entrypoint:
        # The CLI takes one entrypoint word; the rest run as the first arguments, as exec would.
        flag("--entrypoint", entrypoint[0])
    args.append(inputs["image"])
    args.extend(entrypoint[1:])
    args.extend(inputs.get("command") or [])
    return args


def _restart_policy(inputs: Mapping[str, Any]) -> str:
    restart, retries = inputs.get("restart") or "no", inputs.get("maxRetryCount")
    return f"{restart}:{_number(retries)}" if restart == "on-failure" and retries else restart


def _mount_flag(name: str, mount: Mapping[str, Any]) -> str:
    _reject_unknown("Container", name, mount,
                    {"type", "source", "target", "readOnly", "bindOptions", "tmpfsOptions"}, "mounts")
    parts = [f"type={mount.get('type') or 'volume'}", f"target={mount['target']}"]
    if mount.get("source"):
        parts.append(f"source={mount['source']}")
    if mount.get("readOnly"):
        parts.append("readonly")
    bind = mount.get("bindOptions") or {}
    _reject_unknown("Container", name, bind, {"propagation"}, "mounts.bindOptions")
    if bind.get("propagation"):
        parts.append(f"bind-propagation={bind['propagation']}")
    tmpfs = mount.get("tmpfsOptions") or {}
    _reject_unknown("Container", name, tmpfs, {"sizeBytes", "mode"}, "mounts.tmpfsOptions")
    if tmpfs.get("sizeBytes"):
        parts.append(f"tmpfs-size={_number(tmpfs['sizeBytes'])}")
    if tmpfs.get("mode"):
        parts.append(f"tmpfs-mode={_number(tmpfs['mode']):o}")
    for part in parts:
        if "," in part:
            raise UnsupportedInput(f"Container {name!r}: mount field {part!r} contains a comma")
    return ",".join(parts)


def _healthcheck_flags(name: str, check: Mapping[str, Any]) -> list[str]:
    _reject_unknown("Container", name, check, {"tests", "interval", "timeout", "retries", "startPeriod"}, "healthcheck")
    tests = list(check.get("tests") or [])
    if not tests or tests[0] not in ("CMD", "CMD-SHELL"):
        raise UnsupportedInput(f"Container {name!r}: healthcheck.tests must start with CMD or CMD-SHELL")
    command = shlex.join(tests[1:]) if tests[0] == "CMD" else tests[1]
    flags = ["--health-cmd", command]
    for key, option in (("interval", "--health-interval"), ("timeout", "--health-timeout"),
                        ("startPeriod", "--health-start-period")):
        if check.get(key):
            flags += [option, check[key]]
    if check.get("retries"):
        flags += ["--health-retries", str(_number(check["retries"]))]
    return flags


# --- command:remote:Command / command:local:Command ---------------------------------------------

_COMMAND_KEYS = {"create", "update", "delete", "stdin", "triggers", "environment", "logging",
                 "addPreviousOutputInEnv"}
_CONNECTION_KEYS = {"host", "port", "user", "privateKey", "dialErrorLimit", "perDialTimeout"}
_LOCAL_KEYS = {"interpreter", "dir"}


@dataclass(frozen=True)
class Connection:
    host: str
    port: int
    user: str
    private_key: str | None
    attempts: int
    connect_timeout: int

    @classmethod
    def from_inputs(cls, name: str, connection: Mapping[str, Any]) -> "Connection":
        _reject_unknown("Command", name, connection, _CONNECTION_KEYS, "connection")
        return cls(
            host=connection["host"],
            port=_number(connection.get("port") or 22),
            user=connection.get("user") or "root",
            private_key=connection.get("privateKey"),
            attempts=_number(connection.get("dialErrorLimit") or 10),
            connect_timeout=_number(connection.get("perDialTimeout") or 15),
        )

    def ssh_args(self, ssh_config: Path, key_file: Path | None) -> list[str]:
        args = ["ssh", "-F", str(ssh_config), "-p", str(self.port), "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", f"ConnectionAttempts={self.attempts}"]
        if key_file is not None:
            args += ["-i", str(key_file), "-o", "IdentitiesOnly=yes"]
        return [*args, f"{self.user}@{self.host}", "--"]


def check_command_inputs(kind: str, name: str, inputs: Mapping[str, Any]) -> None:
    known = _COMMAND_KEYS | ({"connection"} if kind == REMOTE_COMMAND else _LOCAL_KEYS)
    _reject_unknown("Command", name, inputs, known)
    if kind == REMOTE_COMMAND and inputs.get("environment"):
        # pulumi-command sends them as ssh `env` requests, which the simulated hosts' sshd
        # (no AcceptEnv) would refuse; putting them on the command line would expose secrets.
        raise UnsupportedInput(f"Command {name!r} declares environment, which the e2e hosts cannot receive")


# --- what each provider's Diff answers ----------------------------------------------------------

# An input whose value is not known yet: the engine puts it in place of every input that comes
# from a resource being replaced, to ask the provider whether that alone replaces the dependent.
UNKNOWN = object()

# terraform-provider-docker internal/provider/resource_docker_container.go: every attribute the
# applier translates is ForceNew but these. resourceDockerContainerUpdate (…_funcs.go) sets the
# first group on the live container (ContainerUpdate); the second lives in the provider's state
# alone (a changed healthcheck, tmpfs or init reaches the container only when something else
# replaces it).
_CONTAINER_LIVE_UPDATE = frozenset({"restart", "maxRetryCount", "cpuShares", "memory", "memorySwap", "cpuSet"})
_CONTAINER_STATE_ONLY = frozenset({"mustRun", "start", "removeVolumes", "destroyGraceSeconds", "tmpfs",
                                   "healthcheck", "init"})
# Attributes of TypeSet there: their order is no change.
_CONTAINER_SETS = frozenset({"envs", "mounts", "volumes", "devices", "capabilities", "securityOpts", "hosts",
                             "dns", "ulimits", "labels", "groupAdds"})


@dataclass(frozen=True)
class Diff:
    """A provider's answer to Diff: the inputs that changed, those of them that force a
    replacement, and whether the provider asks to delete the old resource first."""

    changed: frozenset[str]
    replaces: frozenset[str] = frozenset()
    delete_before_replace: bool = False


def provider_diff(type_: str, olds: Mapping[str, Any], news: Mapping[str, Any]) -> Diff:
    """What the provider of `type_` answers for applied inputs `olds` and declared inputs `news`."""
    if type_ == CONTAINER:
        changed = _changed_keys(olds, news, unordered=_CONTAINER_SETS)
        replaces = changed - _CONTAINER_LIVE_UPDATE - _CONTAINER_STATE_ONLY
        # pulumi-docker provider/resources.go gives docker_container `DeleteBeforeReplace: true`;
        # pulumi-terraform-bridge's Diff (pkg/tfbridge/provider.go) answers it with every replacement.
        return Diff(changed, replaces, delete_before_replace=bool(replaces))
    changed = _changed_keys(olds, news)
    if type_ in (REMOTE_COMMAND, LOCAL_COMMAND):
        # pulumi-command (provider/pkg/provider/common/inputs.go) marks `triggers` alone
        # replaceOnChanges; pulumi-go-provider's default Diff (infer/resource.go) updates in place
        # for any other change and never asks to delete first.
        return Diff(changed, changed & {"triggers"})
    # pulumi-docker's Image (provider/provider.go, Diff) rebuilds in place; a provider's new
    # settings reach the resources that name it from then on.
    return Diff(changed)


def engine_diff(type_: str, olds: Mapping[str, Any], news: Mapping[str, Any],
                replace_on_changes: Sequence[str]) -> Diff:
    """The provider's Diff as the engine acts on it, the resource's `replace_on_changes` applied."""
    return with_replace_on_changes(provider_diff(type_, olds, news), replace_on_changes)


def with_replace_on_changes(diff: Diff, paths: Sequence[str]) -> Diff:
    """`diff` once the engine has applied a `replace_on_changes` option (applyReplaceOnChanges in
    step_generator.go): a change under one of `paths` replaces; the provider's wish to delete
    first stays as it was. Paths count by their top-level property (`triggers[*]`, which
    pulumi-command's SDK adds to every Command, covers any change to `triggers`)."""
    heads = {re.match(r"[^.\[]*", path).group(0) for path in paths}
    forced = diff.changed if "*" in heads else diff.changed & heads
    return dataclasses.replace(diff, replaces=diff.replaces | forced)


def _changed_keys(olds: Mapping[str, Any], news: Mapping[str, Any],
                  unordered: frozenset[str] = frozenset()) -> frozenset[str]:
    def value(key: str, inputs: Mapping[str, Any]) -> str | None:
        found = inputs.get(key)
        if _is_unset(found):
            return None
        return _canonical(_sorted_lists(found) if key in unordered else found)

    return frozenset(k for k in set(olds) | set(news) if news.get(k) is UNKNOWN or value(k, olds) != value(k, news))


def _sorted_lists(value: Any) -> Any:
    if isinstance(value, list):
        return sorted((_sorted_lists(v) for v in value), key=_canonical)
    if isinstance(value, dict):
        return {k: _sorted_lists(v) for k, v in value.items()}
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --- the state of what has been applied, and its dependency graph -------------------------------

def provider_urn(reference: str) -> str:
    """The URN in a provider reference ("<urn>::<id>")."""
    return reference.rsplit("::", 1)[0]


@dataclass
class Applied:
    """One resource as the engine keeps it in its state: inputs, outputs, and what it depends on."""

    urn: str
    type: str
    name: str
    id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    provider: str | None = None  # the provider reference it was registered with
    custom: bool = True
    parent: str | None = None
    dependencies: list[str] = field(default_factory=list)
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)
    replace_on_changes: list[str] = field(default_factory=list)
    retain_on_delete: bool = False

    @classmethod
    def declared(cls, resource: RecordedResource, inputs: dict[str, Any]) -> "Applied":
        return cls(resource.urn, resource.type, resource.name, "", inputs, {}, resource.provider, resource.custom,
                   resource.parent, list(resource.dependencies), dict(resource.property_dependencies),
                   list(resource.replace_on_changes), resource.retain_on_delete)

    def dependency_urns(self) -> set[str]:
        """What it depends on, its parent aside: explicit and input dependencies, its provider."""
        urns = set(self.dependencies).union(*self.property_dependencies.values())
        if self.provider:
            urns.add(provider_urn(self.provider))
        return urns


def dependent_replacements(graph: Sequence[Applied], root: Applied, registered: set[str]) -> list[Applied]:
    """The resources a delete-before-replace of `root` deletes first, in dependency order.

    The engine's calculateDependentReplacements (step_generator.go): walk the resources after
    `root` in the previous state `graph` (dependencies first) that depend on it, directly or
    through others, skipping those this apply has registered already; one is replaced if its
    provider is, or if its provider's Diff replaces it once every input that comes from a
    replaced resource is unknown. A plain `depends_on` replaces nothing.
    """
    replacing, reached, found = {root.urn}, {root.urn}, []
    for candidate in graph[next(i for i, r in enumerate(graph) if r is root) + 1:]:
        if candidate.urn in registered or not candidate.dependency_urns() & reached:
            continue
        reached.add(candidate.urn)
        if _replaced_with(candidate, replacing):
            found.append(candidate)
            replacing.add(candidate.urn)
    return found


def _replaced_with(resource: Applied, replacing: set[str]) -> bool:
    if not resource.custom:
        return False
    if resource.provider and provider_urn(resource.provider) in replacing:
        return True
    unknown = {key for key, urns in resource.property_dependencies.items()
               if key in resource.inputs and replacing.intersection(urns)}
    if not unknown:
        return False
    news = {**resource.inputs, **dict.fromkeys(unknown, UNKNOWN)}
    return bool(engine_diff(resource.type, resource.inputs, news, resource.replace_on_changes).replaces)


def delete_schedule(graph: Sequence[Applied], condemned: Iterable[Applied]) -> list[list[Applied]]:
    """`condemned` (resources of `graph`) in antichains, to delete one antichain after another.

    The engine's ScheduleDeletes (step_generator.go): repeatedly take the condemned resources
    none of whose direct dependencies (DependenciesOf in pkg/resource/graph/dependency_graph.go:
    explicit, input, provider, parent, and a component's children before it) is still
    condemned, then reverse the list: dependents are deleted before what they depend on.
    """
    depends = direct_dependencies(graph)
    remaining = {id(r): r for r in condemned}
    antichains: list[list[Applied]] = []
    while remaining:
        antichain = [r for r in remaining.values() if not depends[id(r)] & remaining.keys()]
        if not antichain:
            raise ApplyError(f"dependency cycle among {sorted(r.urn for r in remaining.values())}")
        for resource in antichain:
            del remaining[id(resource)]
        antichains.append(antichain)
    return antichains[::-1]


def direct_dependencies(graph: Sequence[Applied]) -> dict[int, set[int]]:
    """For each resource of `graph` (by id()), those before it in `graph` it depends on directly."""
    children: dict[str, list[int]] = {}
    by_urn = {r.urn: r for r in graph}
    for index, resource in enumerate(graph):
        parent = resource.parent
        while parent:
            children.setdefault(parent, []).append(index)
            parent = by_urn[parent].parent if parent in by_urn else None
    depends: dict[int, set[int]] = {}
    for index, resource in enumerate(graph):
        wanted = resource.dependency_urns() | ({resource.parent} if resource.parent else set())
        found: set[int] = set()
        for candidate in graph[:index]:
            if candidate.urn in wanted:
                found.add(id(candidate))
                if not candidate.custom:
                    found.update(id(graph[c]) for c in children.get(candidate.urn, ()) if c < index)
        depends[id(resource)] = found
    return depends


def _transitive(depends: Mapping[int, set[int]], start: int) -> set[int]:
    seen: set[int] = set()
    stack = [start]
    while stack:
        for dep in depends.get(stack.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


@dataclass(frozen=True)
class Step:
    """One step, with Pulumi's names for them (pkg/resource/deploy/step.go): create, update,
    same, create-replacement, delete-replaced, delete. `started` and `finished` count every
    start and end of this apply's steps, so a step that finished before another started shows."""

    op: str
    name: str
    type: str
    started: int
    finished: int


_OUTCOME = {"create": "created", "create-replacement": "replaced", "update": "updated", "same": "unchanged",
            "delete": "deleted"}


@dataclass
class ApplyLog:
    """What one apply or destroy did: its steps in the order they finished, and for each resource
    what became of it: created, replaced, updated, unchanged or deleted."""

    steps: list[Step] = field(default_factory=list)
    actions: dict[str, str] = field(default_factory=dict)

    def record(self, step: Step) -> None:
        self.steps.append(step)
        if step.op == "delete-replaced":
            # Deleted for good unless its replacement is (or was) created in this apply.
            self.actions.setdefault(step.name, "deleted")
        else:
            self.actions[step.name] = _OUTCOME[step.op]

    def changed(self) -> dict[str, str]:
        return {name: action for name, action in self.actions.items() if action != "unchanged"}

    def ops(self) -> list[tuple[str, str]]:
        """(op, name) of every step that did something, in the order they finished."""
        return [(s.op, s.name) for s in self.steps if s.op != "same"]

    def step(self, op: str, name: str) -> Step:
        matches = [s for s in self.steps if (s.op, s.name) == (op, name)]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} steps {op} {name}; steps: {self.ops()}")
        return matches[0]

    def before(self, first: tuple[str, str], then: tuple[str, str]) -> bool:
        """Whether step `first` (op, name) had finished when step `then` started."""
        return self.step(*first).finished < self.step(*then).started


@dataclass
class Site:
    """How the applier reaches the world: ssh settings for the hosts, and the image builder."""

    ssh_config: Path
    workdir: Path
    # (context, dockerfile, build args) -> (tarball, tag inside it)
    build_image: Callable[[Path, Path, Mapping[str, str]], tuple[Path, str]]
    log: Path | None = None
    # Where a build's relative context and Dockerfile lie (the program declares them relative to the
    # project, and `pulumi up` runs in the project's directory).
    project: Path = REPO
    # "This machine" of a localDocker stack: the engine its local Docker socket stands for, and how a
    # local command enters that machine (e.g. a simulated host's nsenter prefix). None: local stacks refused.
    local_engine: str | None = None
    local_prefix: Sequence[str] = ()


# --- the applier --------------------------------------------------------------------------------

class Applier(pulumi.runtime.Mocks):
    """Pulumi mocks that create each registered resource for real (see the module docstring).

    `state` holds what is applied, dependencies first; `pending_deletes` the replaced copies a
    failed apply left for the next one to delete. One apply runs between `begin` and `finish`
    (see `apply`).
    """

    def __init__(self, site: Site):
        self.site = site
        self.state: dict[str, Applied] = {}
        self.pending_deletes: list[Applied] = []
        self.log = ApplyLog()
        self._providers: dict[str, str] = {}  # provider reference "urn::id" id part -> docker host
        self._lock = threading.Lock()
        self._in_flight = 0
        self._settled = threading.Condition(self._lock)
        self._ticks = itertools.count()
        site.workdir.mkdir(parents=True, exist_ok=True)
        self.begin()

    def begin(self) -> None:
        """Start an apply: what is applied now is the previous state its steps are decided against."""
        self.log = ApplyLog()
        self._graph = [*self.pending_deletes, *self.state.values()]  # the engine's depGraph
        self._olds = dict(self.state)
        self._next: dict[str, Applied] = {}  # registered in this apply, in the order they settled
        self._registered: set[str] = set()  # URNs this apply registered or deleted
        # URN -> (the resource a dependency's delete-before-replace deletes, an event set once it ran)
        self._recreating: dict[str, tuple[Applied, threading.Event]] = {}
        self._condemned = list(self.pending_deletes)  # replaced copies, deleted at the end
        self._deleted: set[int] = set()  # id() of the previous resources deleted so far

    def finish(self, succeeded: bool) -> None:
        """End an apply: when it succeeded, delete the copies it replaced and what the program no
        longer registers; then keep what exists as the state the next apply starts from."""
        try:
            if succeeded:
                self._delete_in_order([("delete-replaced", r) for r in self._condemned]
                                      + [("delete", r) for r in self._olds.values() if r.urn not in self._registered])
        finally:
            self._keep_what_exists()

    def destroy(self) -> list[str]:
        """Delete everything applied (`pulumi destroy`); returns the names of the resources whose
        provider deleted them, in the order they went."""
        self.begin()
        retained = {r.name for r in self._graph if r.retain_on_delete}
        try:
            self._delete_in_order([("delete", r) for r in self._graph])
        finally:
            self._keep_what_exists()
        return [s.name for s in self.log.steps if s.op == "delete" and s.name not in retained]

    def _keep_what_exists(self) -> None:
        self.state = dict(self._next)
        for old in self._olds.values():
            if old.urn not in self._next and id(old) not in self._deleted:
                self.state[old.urn] = old
        self.pending_deletes = [r for r in self._condemned if id(r) not in self._deleted]

    def wait_in_flight(self, timeout: float = 3600) -> None:
        """Wait for operations still running: the SDK stops waiting at the first failure, as
        `pulumi up` does not (it lets started operations finish and records them)."""
        with self._settled:
            if not self._settled.wait_for(lambda: self._in_flight == 0, timeout=timeout):
                raise ApplyError(f"{self._in_flight} operations still running after {timeout}s")

    # Pulumi's mocks interface ------------------------------------------------------------------

    def call(self, args: pulumi.runtime.MockCallArgs):
        raise UnsupportedInput(f"the program invokes {args.token}, which the e2e applier does not provide")

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        declared = current_registration()
        if declared is None or declared.name != args.name:
            raise ApplyError(f"{args.name!r} was not registered through run_program (tests/support/pulumi_program.py)")
        with self._lock:
            self._in_flight += 1
        try:
            # Secrets (the ssh key, the API key) arrive wrapped; a provider sees their values.
            applied = self._register(declared, unwrap_secrets(dict(args.inputs), "", []))
            return applied.id, applied.outputs
        finally:
            with self._settled:
                self._in_flight -= 1
                self._settled.notify_all()

    # deciding the steps (the engine's step generator) ------------------------------------------

    def _register(self, declared: RecordedResource, inputs: dict[str, Any]) -> Applied:
        _check_options(declared)
        new = Applied.declared(declared, inputs)
        with self._lock:
            self._registered.add(new.urn)
            if not declared.custom:  # a component: nothing to apply, but part of the graph
                self._next[new.urn] = dataclasses.replace(new, outputs=dict(inputs))
                return self._next[new.urn]
            old, recreating = self._olds.get(new.urn), self._recreating.pop(new.urn, None)
            diff = engine_diff(new.type, old.inputs, inputs, new.replace_on_changes) if old and not recreating else None
            asked = declared.delete_before_replace
            delete_first = bool(diff and diff.replaces) and (diff.delete_before_replace if asked is None else asked)
            # Resources already registered (or deleted) in this apply cannot depend on it any more.
            dependents = dependent_replacements(self._graph, old, self._registered) if delete_first else []
            deleting = {d.urn: (d, threading.Event()) for d in dependents}
            self._recreating.update(deleting)
            self._registered.update(deleting)
        if recreating is not None:
            # Deleted earlier in this apply for a dependency's delete-before-replace: the engine's
            # "Case 1: recreating", a replacement whatever the diff.
            deleted, gone = recreating
            gone.wait()
            if id(deleted) not in self._deleted:
                raise ApplyError(f"{new.name!r} is not created again: its delete failed")
            return self._settle(self._step("create-replacement", new, lambda: self._create(new)))
        if old is None:
            return self._settle(self._step("create", new, lambda: self._create(new)))
        if not diff.changed:
            return self._settle(self._step("same", new, lambda: self._with(new, old.id, old.outputs)))
        if not diff.replaces:
            return self._settle(self._step("update", new, lambda: self._update(old, new, diff)))
        if not delete_first:
            created = self._step("create-replacement", new, lambda: self._create(new))
            with self._lock:
                self._condemned.append(old)
            return self._settle(created)
        try:
            for dependent in reversed(dependents):  # dependents before what they depend on
                self._step("delete-replaced", dependent, lambda d=dependent: self._delete(d))
        finally:
            for _, gone in deleting.values():
                gone.set()
        self._step("delete-replaced", old, lambda: self._delete(old))
        return self._settle(self._step("create-replacement", new, lambda: self._create(new)))

    def _settle(self, applied: Applied) -> Applied:
        with self._lock:
            self._next[applied.urn] = applied
        return applied

    def _step(self, op: str, resource: Applied, act: Callable[[], Applied | None]) -> Any:
        with self._lock:
            started = next(self._ticks)
        began = time.monotonic()
        result = act()
        with self._lock:
            self.log.record(Step(op, resource.name, resource.type, started, next(self._ticks)))
        self._note(f"{op:18} {resource.type} {resource.name} ({time.monotonic() - began:.1f}s)")
        return result

    def _delete_in_order(self, doomed: list[tuple[str, Applied]]) -> None:
        """Delete `doomed` ((op, resource) of the previous state) antichain by antichain; after a
        failure, what the failed resource depends on stays, as in the engine's performPostSteps."""
        ops = {id(r): op for op, r in doomed}
        depends = direct_dependencies(self._graph)
        kept: set[int] = set()
        errors: list[BaseException] = []
        for antichain in delete_schedule(self._graph, [r for _, r in doomed]):
            antichain = [r for r in antichain if id(r) not in kept]
            with ThreadPoolExecutor(max_workers=max(len(antichain), 1)) as pool:
                futures = [(r, pool.submit(self._delete_step, ops[id(r)], r)) for r in antichain]
            for resource, future in futures:
                if future.exception() is not None:
                    errors.append(future.exception())
                    kept |= _transitive(depends, id(resource))
        if errors:
            raise errors[0]

    def _delete_step(self, op: str, resource: Applied) -> None:
        if resource.custom:
            self._step(op, resource, lambda: self._delete(resource))
        else:
            with self._lock:
                self._deleted.add(id(resource))

    # what each provider does -------------------------------------------------------------------

    def _create(self, new: Applied) -> Applied:
        if new.type == PROVIDER:
            return self._provider(new)
        if new.type == CONTAINER:
            return self._create_container(new)
        if new.type in (REMOTE_COMMAND, LOCAL_COMMAND):
            check_command_inputs(new.type, new.name, new.inputs)
            result = self._run_command(new, new.inputs.get("create"), previous=None)
            # pulumi-command names a command `<name><8 hex digits>` (resource.NewUniqueHex).
            return self._with(new, f"{new.name}{secrets.token_hex(4)}", _command_outputs(new.inputs, result, None))
        if new.type == IMAGE:
            return self._image(new)
        raise UnsupportedInput(f"resource {new.name!r} has type {new.type}, which the e2e applier does not apply")

    def _update(self, old: Applied, new: Applied, diff: Diff) -> Applied:
        if new.type == CONTAINER:
            with tempfile.TemporaryDirectory(dir=self.site.workdir) as scratch:
                container_create_args(new.inputs, env_file=Path(scratch) / "env")  # rejects what is not translated
            docker = self._docker_for(new)
            if diff.changed & _CONTAINER_LIVE_UPDATE:
                self._run([*docker, "update", *container_update_args(new.inputs), old.id],
                          what=f"docker update {new.name}")
            if old.inputs.get("mustRun") is False and new.inputs.get("mustRun") is not False \
                    and new.inputs.get("start") is not False:
                self._run([*docker, "start", old.id], what=f"docker start {new.name}")
            return self._with(new, old.id, {**new.inputs, "id": old.id})
        if new.type in (REMOTE_COMMAND, LOCAL_COMMAND):
            check_command_inputs(new.type, new.name, new.inputs)
            script = new.inputs.get("update") or new.inputs.get("create")
            result = self._run_command(new, script, previous=old.outputs)
            return self._with(new, old.id, _command_outputs(new.inputs, result, old.outputs))
        if new.type == IMAGE:
            return self._image(new)
        return self._provider(new)

    def _delete(self, old: Applied) -> None:
        if not old.retain_on_delete:
            if old.type == CONTAINER:
                self._remove_container(old)
            elif old.type in (REMOTE_COMMAND, LOCAL_COMMAND):
                self._run_command(old, old.inputs.get("delete"), previous=old.outputs)
            # pulumi-docker's Image deletes nothing; a provider holds nothing.
        with self._lock:
            self._deleted.add(id(old))

    @staticmethod
    def _with(new: Applied, id_: str, outputs: dict[str, Any]) -> Applied:
        return dataclasses.replace(new, id=id_, outputs=outputs)

    def _provider(self, new: Applied) -> Applied:
        _reject_unknown("docker provider", new.name, new.inputs, {"host", "sshOpts", "version"})
        host = new.inputs.get("host") or ""
        if host.startswith("unix://") and self.site.local_engine:
            host = self.site.local_engine
        elif not host.startswith("ssh://"):
            raise UnsupportedInput(f"docker provider {new.name!r}: host {host!r} is not ssh://; the e2e hosts are remote")
        ssh_opts = new.inputs.get("sshOpts") or []
        if isinstance(ssh_opts, str):  # provider inputs travel JSON-encoded
            ssh_opts = json.loads(ssh_opts)
        provider_id = f"{new.name}-provider"
        with self._lock:
            self._providers[provider_id] = host
            self._ssh_wrapper(provider_id, ssh_opts)
        return self._with(new, provider_id, dict(new.inputs))

    def _create_container(self, new: Applied) -> Applied:
        docker = self._docker_for(new)
        with tempfile.TemporaryDirectory(dir=self.site.workdir) as scratch:
            create = container_create_args(new.inputs, env_file=Path(scratch) / "env")
            self._run([*docker, "create", *create], what=f"docker create {new.name}")
        name = new.inputs.get("name") or ""
        self._run([*docker, "start", name], what=f"docker start {new.name}")
        container_id = self._run([*docker, "inspect", "--format", "{{.Id}}", name], what="docker inspect").stdout.strip()
        return self._with(new, container_id, {**new.inputs, "id": container_id})

    def _image(self, new: Applied) -> Applied:
        inputs = new.inputs
        _reject_unknown("Image", new.name, inputs, {"imageName", "build", "skipPush", "buildOnPreview"})
        if not inputs.get("skipPush"):
            raise UnsupportedInput(f"Image {new.name!r} is pushed to a registry; the e2e hosts have none")
        build = inputs.get("build") or {}
        _reject_unknown("Image", new.name, build, {"context", "dockerfile", "args", "platform"}, "build")
        if build.get("platform") not in (None, "linux/amd64"):
            raise UnsupportedInput(f"Image {new.name!r}: platform {build['platform']} is not this machine's")
        context = self.site.project / build["context"]
        dockerfile = self.site.project / (build.get("dockerfile") or Path(build["context"]) / "Dockerfile")
        tarball, saved_tag = self.site.build_image(context, dockerfile, dict(build.get("args") or {}))
        docker = self._docker_for(new)
        self._run([*docker, "load", "--quiet", "--input", str(tarball)], what=f"docker load {new.name}", timeout=1800)
        self._run([*docker, "tag", saved_tag, inputs["imageName"]], what=f"docker tag {new.name}")
        return self._with(new, inputs["imageName"], {**inputs, "repoDigest": "", "baseImageName": inputs["imageName"]})

    # helpers -----------------------------------------------------------------------------------

    def _docker_for(self, resource: Applied) -> list[str]:
        if not resource.provider:
            raise UnsupportedInput(f"{resource.type} {resource.name!r} names no docker provider; the e2e hosts are remote")
        provider_id = resource.provider.rsplit("::", 1)[-1]
        with self._lock:
            host = self._providers.get(provider_id)
        if host is None:
            raise ApplyError(f"{resource.name!r} names provider {resource.provider}, which was not registered first")
        return ["env", f"PATH={self._wrapper_dir(provider_id)}:{os.environ['PATH']}", "docker", "-H", host]

    def _wrapper_dir(self, provider_id: str) -> Path:
        return self.site.workdir / "ssh-for" / provider_id

    def _ssh_wrapper(self, provider_id: str, ssh_opts: list[str]) -> None:
        """Docker's ssh:// transport runs `ssh`; this one adds the hosts' ssh config and the
        provider's declared sshOpts, as the provider would."""
        directory = self._wrapper_dir(provider_id)
        directory.mkdir(parents=True, exist_ok=True)
        wrapper = directory / "ssh"
        wrapper.write_text(
            "#!/bin/sh\nexec /usr/bin/ssh -F " + shlex.quote(str(self.site.ssh_config)) + " "
            + shlex.join(ssh_opts) + ' "$@"\n'
        )
        wrapper.chmod(0o755)

    def _remove_container(self, applied: Applied) -> None:
        """resourceDockerContainerDelete: stop (destroyGraceSeconds, else at once), remove by force."""
        docker = self._docker_for(applied)
        grace = _number(applied.inputs.get("destroyGraceSeconds") or 0)
        self._run([*docker, "stop", "-t", str(grace), applied.id], what=f"docker stop {applied.name}", check=False)
        volumes = ["-v"] if applied.inputs.get("removeVolumes") else []
        removed = self._run([*docker, "rm", "-f", *volumes, applied.id], what=f"docker rm {applied.name}", check=False)
        if removed.returncode and "No such container" not in removed.stderr:
            raise ApplyError(f"docker rm {applied.name} failed: {removed.stderr.strip()}")

    def _run_command(self, resource: Applied, script: str | None,
                     previous: Mapping[str, Any] | None) -> subprocess.CompletedProcess | None:
        if not script:
            return None
        inputs = resource.inputs
        stdin = inputs.get("stdin")
        if resource.type == LOCAL_COMMAND:
            interpreter = list(inputs.get("interpreter") or ["/bin/sh", "-c"])
            env = {**os.environ, **(inputs.get("environment") or {}), **_previous_output_env(inputs, previous)}
            if self.site.local_engine:
                env["DOCKER_HOST"] = self.site.local_engine
            return self._run([*self.site.local_prefix, *interpreter, script], what=f"command {resource.name}",
                             input=stdin, env=env,
                             cwd=inputs.get("dir") or None, timeout=None)
        # A remote command's previous output would travel as ssh `env` requests, which the hosts'
        # sshd refuses; pulumi-command (remote/commandOutputs.go) then warns and runs without it.
        connection = Connection.from_inputs(resource.name, inputs["connection"])
        with tempfile.TemporaryDirectory(dir=self.site.workdir) as scratch:
            key_file = None
            if connection.private_key:
                key_file = Path(scratch) / "key"
                key_file.touch(mode=0o600)
                key_file.write_text(connection.private_key.rstrip("\n") + "\n")
            argv = connection.ssh_args(self.site.ssh_config, key_file) + [script]
            return self._run(argv, what=f"command {resource.name} on {connection.host}", input=stdin, timeout=None)

    def _run(self, argv: list[str], *, what: str, check: bool = True, timeout: float | None = 600,
             **kwargs) -> subprocess.CompletedProcess:
        if kwargs.get("input") is None:
            kwargs.pop("input", None)
            kwargs["stdin"] = subprocess.DEVNULL
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
            raise ApplyError(f"{what} failed with exit code {result.returncode}:\n{tail}")
        return result

    def _note(self, line: str) -> None:
        if self.site.log is not None:
            with self._lock, self.site.log.open("a") as out:
                out.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def _check_options(declared: RecordedResource) -> None:
    for option, value in (("ignore_changes", declared.ignore_changes), ("deleted_with", declared.deleted_with)):
        if value:
            raise UnsupportedInput(f"{declared.name!r} sets {option}, which the e2e applier does not honour: add it")


def container_update_args(inputs: Mapping[str, Any]) -> list[str]:
    """`docker update` arguments for what resourceDockerContainerUpdate sets on a live container."""
    args = ["--restart", _restart_policy(inputs)]
    for key, option in (("cpuShares", "--cpu-shares"), ("memory", "--memory"), ("memorySwap", "--memory-swap")):
        if inputs.get(key) is not None:
            amount = _number(inputs[key])
            args += [option, f"{amount}m" if key != "cpuShares" and amount > 0 else str(amount)]
    if inputs.get("cpuSet"):
        args += ["--cpuset-cpus", inputs["cpuSet"]]
    return args


def _command_outputs(inputs: Mapping[str, Any], result: subprocess.CompletedProcess | None,
                     previous: Mapping[str, Any] | None) -> dict[str, Any]:
    # pulumi-command keeps the previous output when nothing ran, and drops one final newline.
    if result is None:
        kept = previous or {}
        return {**inputs, "stdout": kept.get("stdout", ""), "stderr": kept.get("stderr", "")}
    return {**inputs, "stdout": result.stdout.removesuffix("\n"), "stderr": result.stderr.removesuffix("\n")}


def _previous_output_env(inputs: Mapping[str, Any], previous: Mapping[str, Any] | None) -> dict[str, str]:
    """PULUMI_COMMAND_STDOUT/STDERR for an update or delete (local/commandOutputs.go)."""
    if previous is None or inputs.get("addPreviousOutputInEnv") is False:
        return {}
    names = {"stdout": "PULUMI_COMMAND_STDOUT", "stderr": "PULUMI_COMMAND_STDERR"}
    return {names[key]: previous[key] for key in names if previous.get(key)}


def apply(config: dict[str, Any], applier: Applier, *, secrets: dict[str, str] | None = None,
          stack: str = "e2e", program: Callable[[], Any] | None = None) -> ProgramRun:
    """Run the program (`program`, else __main__.py) once with `applier` as its providers, as
    `pulumi up`; raises what the first failure raised."""
    applier.begin()
    succeeded = False
    try:
        run = run_program(config, stack=stack, secrets=secrets, mocks=applier, program=program)
        applier.wait_in_flight()
        succeeded = run.error is None
    finally:
        applier.finish(succeeded)
    if run.error is not None:
        raise ApplyError(f"apply failed: {run.error}") from run.error
    return run
