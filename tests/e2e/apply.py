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

A second apply with unchanged inputs changes nothing (inputs equal to the applied ones keep the
applied outputs); a changed container is replaced, a changed command re-run (replaced when its
triggers or connection change, as pulumi-command does). `destroy` removes in reverse dependency
order and honours `retain_on_delete` and commands' `delete` scripts.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pulumi

from tests.support.pulumi_program import ProgramRun, RecordedResource, run_program
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
    restart = inputs.get("restart")
    if restart:
        retries = inputs.get("maxRetryCount")
        flag("--restart", f"{restart}:{_number(retries)}" if restart == "on-failure" and retries else restart)
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
                 "addPreviousOutputInStdout"}
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
    if inputs.get("addPreviousOutputInStdout"):
        raise UnsupportedInput(f"Command {name!r} declares addPreviousOutputInStdout, not translated")
    if kind == REMOTE_COMMAND and inputs.get("environment"):
        # pulumi-command sends them as ssh `env` requests, which the simulated hosts' sshd
        # (no AcceptEnv) would refuse; putting them on the command line would expose secrets.
        raise UnsupportedInput(f"Command {name!r} declares environment, which the e2e hosts cannot receive")


def _changed(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str]) -> bool:
    return any(_canonical(old.get(k)) != _canonical(new.get(k)) for k in keys)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --- the state of what has been applied ---------------------------------------------------------

@dataclass
class Applied:
    type: str
    name: str
    id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    provider: str | None
    seconds: float = 0.0


@dataclass
class ApplyLog:
    """What one apply did, per resource: created, replaced, updated or unchanged."""

    actions: dict[str, str] = field(default_factory=dict)

    def changed(self) -> dict[str, str]:
        return {name: action for name, action in self.actions.items() if action != "unchanged"}


@dataclass
class Site:
    """How the applier reaches the world: ssh settings for the hosts, and the image builder."""

    ssh_config: Path
    workdir: Path
    # (context, dockerfile, build args) -> (tarball, tag inside it)
    build_image: Callable[[Path, Path, Mapping[str, str]], tuple[Path, str]]
    log: Path | None = None


class Applier(pulumi.runtime.Mocks):
    """Pulumi mocks that create each registered resource for real (see the module docstring)."""

    def __init__(self, site: Site, state: dict[tuple[str, str], Applied] | None = None):
        self.site = site
        self.state: dict[tuple[str, str], Applied] = state if state is not None else {}
        self.log = ApplyLog()
        self._providers: dict[str, str] = {}  # provider reference "urn::id" id part -> docker host
        self._lock = threading.Lock()
        self._in_flight = 0
        self._settled = threading.Condition(self._lock)
        site.workdir.mkdir(parents=True, exist_ok=True)

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
        if not args.custom:
            return "", dict(args.inputs)
        with self._lock:
            self._in_flight += 1
        try:
            return self._apply(args)
        finally:
            with self._settled:
                self._in_flight -= 1
                self._settled.notify_all()

    def _apply(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        started = time.monotonic()
        # Secrets (the ssh key, the API key) arrive wrapped; a provider sees their values.
        inputs = unwrap_secrets(dict(args.inputs), "", [])
        key = (args.typ, args.name)
        with self._lock:
            previous = self.state.get(key)
        if args.typ == PROVIDER:
            applied = self._provider(args, inputs)
            action = "unchanged" if previous else "created"
        elif previous is not None and _canonical(previous.inputs) == _canonical(inputs):
            applied, action = previous, "unchanged"
        elif args.typ == CONTAINER:
            applied, action = self._container(args, inputs, previous)
        elif args.typ in (REMOTE_COMMAND, LOCAL_COMMAND):
            applied, action = self._command(args, inputs, previous)
        elif args.typ == IMAGE:
            applied, action = self._image(args, inputs), "replaced" if previous else "created"
        else:
            raise UnsupportedInput(f"resource {args.name!r} has type {args.typ}, which the e2e applier does not apply")
        applied.seconds = time.monotonic() - started
        with self._lock:
            self.state[key] = applied
            self.log.actions[args.name] = action
        self._note(f"{action:9} {args.typ} {args.name} ({applied.seconds:.1f}s)")
        return applied.id, applied.outputs

    # per type ----------------------------------------------------------------------------------

    def _provider(self, args, inputs: dict) -> Applied:
        _reject_unknown("docker provider", args.name, inputs, {"host", "sshOpts", "version"})
        host = inputs.get("host") or ""
        if not host.startswith("ssh://"):
            raise UnsupportedInput(f"docker provider {args.name!r}: host {host!r} is not ssh://; the e2e hosts are remote")
        ssh_opts = inputs.get("sshOpts") or []
        if isinstance(ssh_opts, str):  # provider inputs travel JSON-encoded
            ssh_opts = json.loads(ssh_opts)
        provider_id = f"{args.name}-provider"
        with self._lock:
            self._providers[provider_id] = host
            self._ssh_wrapper(provider_id, ssh_opts)
        return Applied(args.typ, args.name, provider_id, inputs, inputs, None)

    def _container(self, args, inputs: dict, previous: Applied | None) -> tuple[Applied, str]:
        docker = self._docker_for(args)
        with tempfile.TemporaryDirectory(dir=self.site.workdir) as scratch:
            create = container_create_args(inputs, env_file=Path(scratch) / "env")
            if previous is not None:
                self._remove_container(previous)
            self._run([*docker, "create", *create], what=f"docker create {args.name}")
        name = inputs.get("name") or ""
        self._run([*docker, "start", name], what=f"docker start {args.name}")
        container_id = self._run([*docker, "inspect", "--format", "{{.Id}}", name], what="docker inspect").stdout.strip()
        outputs = {**inputs, "id": container_id}
        return Applied(args.typ, args.name, container_id, inputs, outputs, args.provider), "replaced" if previous else "created"

    def _command(self, args, inputs: dict, previous: Applied | None) -> tuple[Applied, str]:
        check_command_inputs(args.typ, args.name, inputs)
        replace = previous is not None and _changed(previous.inputs, inputs, ("triggers", "connection", "interpreter", "dir"))
        script = inputs.get("create")
        action = "created"
        if previous is not None and not replace:
            script, action = inputs.get("update") or inputs.get("create"), "updated"
        result = self._run_command(args.typ, args.name, inputs, script) if script else None
        if replace:
            action = "replaced"
            if previous.inputs.get("delete"):
                self._run_command(previous.type, previous.name, previous.inputs, previous.inputs["delete"])
        outputs = {**inputs, "stdout": result.stdout if result else "", "stderr": result.stderr if result else ""}
        return Applied(args.typ, args.name, f"{args.name}-{time.time_ns()}", inputs, outputs, None), action

    def _image(self, args, inputs: dict) -> Applied:
        _reject_unknown("Image", args.name, inputs, {"imageName", "build", "skipPush", "buildOnPreview"})
        if not inputs.get("skipPush"):
            raise UnsupportedInput(f"Image {args.name!r} is pushed to a registry; the e2e hosts have none")
        build = inputs.get("build") or {}
        _reject_unknown("Image", args.name, build, {"context", "dockerfile", "args", "platform"}, "build")
        if build.get("platform") not in (None, "linux/amd64"):
            raise UnsupportedInput(f"Image {args.name!r}: platform {build['platform']} is not this machine's")
        context = Path(build["context"])
        dockerfile = Path(build.get("dockerfile") or context / "Dockerfile")
        tarball, saved_tag = self.site.build_image(context, dockerfile, dict(build.get("args") or {}))
        docker = self._docker_for(args)
        self._run([*docker, "load", "--quiet", "--input", str(tarball)], what=f"docker load {args.name}", timeout=1800)
        self._run([*docker, "tag", saved_tag, inputs["imageName"]], what=f"docker tag {args.name}")
        outputs = {**inputs, "repoDigest": "", "baseImageName": inputs["imageName"]}
        return Applied(args.typ, args.name, inputs["imageName"], inputs, outputs, args.provider)

    # destroy -----------------------------------------------------------------------------------

    def destroy(self, run: ProgramRun) -> list[str]:
        """Delete what was applied, dependents first; returns the names deleted or run."""
        done: list[str] = []
        for resource in deletion_order(run.resources):
            applied = self.state.get((resource.type, resource.name))
            if applied is None or resource.retain_on_delete:
                continue
            if applied.type == CONTAINER:
                self._remove_container(applied)
                done.append(applied.name)
            elif applied.type in (REMOTE_COMMAND, LOCAL_COMMAND) and applied.inputs.get("delete"):
                self._run_command(applied.type, applied.name, applied.inputs, applied.inputs["delete"])
                done.append(applied.name)
            # Images stay on the hosts (pulumi-docker's Image deletes nothing); providers hold nothing.
            del self.state[(resource.type, resource.name)]
        return done

    # helpers -----------------------------------------------------------------------------------

    def _docker_for(self, args) -> list[str]:
        if not args.provider:
            raise UnsupportedInput(f"{args.typ} {args.name!r} names no docker provider; the e2e hosts are remote")
        provider_id = args.provider.rsplit("::", 1)[-1]
        with self._lock:
            host = self._providers.get(provider_id)
        if host is None:
            raise ApplyError(f"{args.name!r} names provider {args.provider}, which was not registered first")
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
        docker = ["env", f"PATH={self._wrapper_dir(applied.provider.rsplit('::', 1)[-1])}:{os.environ['PATH']}",
                  "docker", "-H", self._providers[applied.provider.rsplit("::", 1)[-1]]]
        grace = applied.inputs.get("destroyGraceSeconds")
        if grace:
            self._run([*docker, "stop", "-t", str(_number(grace)), applied.inputs["name"]], what="docker stop", check=False)
        volumes = ["-v"] if applied.inputs.get("removeVolumes") else []
        self._run([*docker, "rm", "-f", *volumes, applied.inputs["name"]], what=f"docker rm {applied.name}", check=False)

    def _run_command(self, kind: str, name: str, inputs: Mapping[str, Any], script: str) -> subprocess.CompletedProcess:
        stdin = inputs.get("stdin")
        if kind == LOCAL_COMMAND:
            interpreter = list(inputs.get("interpreter") or ["/bin/sh", "-c"])
            env = {**os.environ, **(inputs.get("environment") or {})}
            return self._run([*interpreter, script], what=f"command {name}", input=stdin, env=env,
                             cwd=inputs.get("dir") or None, timeout=None)
        connection = Connection.from_inputs(name, inputs["connection"])
        with tempfile.TemporaryDirectory(dir=self.site.workdir) as scratch:
            key_file = None
            if connection.private_key:
                key_file = Path(scratch) / "key"
                key_file.touch(mode=0o600)
                key_file.write_text(connection.private_key.rstrip("\n") + "\n")
            argv = connection.ssh_args(self.site.ssh_config, key_file) + [script]
            return self._run(argv, what=f"command {name} on {connection.host}", input=stdin, timeout=None)

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


def deletion_order(resources: list[RecordedResource]) -> list[RecordedResource]:
    """Custom resources, each after everything that depends on it (reverse creation order)."""
    customs = {r.urn: r for r in resources if r.custom}
    parents = {r.urn: r.parent for r in resources}

    def custom_dependencies(resource: RecordedResource) -> set[str]:
        # A dependency on a component is one on each custom resource inside it.
        found: set[str] = set()
        for dep in resource.dependencies:
            if dep in customs:
                found.add(dep)
            else:
                found.update(u for u in customs if _inside(u, dep, parents))
        return found

    dependents: dict[str, set[str]] = {urn: set() for urn in customs}
    for resource in customs.values():
        for dep in custom_dependencies(resource):
            dependents[dep].add(resource.urn)
    order: list[RecordedResource] = []
    placed: set[str] = set()
    remaining = list(customs)
    while remaining:
        ready = [u for u in remaining if dependents[u] <= placed]
        if not ready:
            raise ApplyError(f"dependency cycle among {sorted(remaining)}")
        for urn in ready:
            order.append(customs[urn])
            placed.add(urn)
        remaining = [u for u in remaining if u not in placed]
    return order


def _inside(urn: str, component: str, parents: Mapping[str, str | None]) -> bool:
    parent = parents.get(urn)
    while parent:
        if parent == component:
            return True
        parent = parents.get(parent)
    return False


def apply(config: dict[str, Any], applier: Applier, *, secrets: dict[str, str] | None = None,
          stack: str = "e2e") -> ProgramRun:
    """Run the program once with `applier` as its providers; raises what the first failure raised."""
    applier.log = ApplyLog()
    run = run_program(config, stack=stack, secrets=secrets, mocks=applier)
    applier.wait_in_flight()
    if run.error is not None:
        raise ApplyError(f"apply failed: {run.error}") from run.error
    return run
