"""Run the real Pulumi program under Pulumi's mocks and record what it registers.

`run_program(config)` returns every resource with its inputs (secrets unwrapped, with the paths
that were secret), its parent, its explicit and implicit dependencies and its provider, plus the
stack outputs. Unit tests assert on that record; the e2e applier applies it to real hosts, and
reads each record while its registration is answered (`current_registration`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import runpy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pulumi

from tests.support import pulumi_sdk

PROJECT = "vllm-dcu"
REPO = Path(__file__).resolve().parents[2]
SECRET_KEYS = ("sshPrivateKey", "hfToken", "modelscopeToken", "apiKey")


@dataclass
class RecordedResource:
    urn: str
    type: str
    name: str
    inputs: dict[str, Any]
    parent: str | None
    dependencies: list[str]
    provider: str | None
    custom: bool
    retain_on_delete: bool
    secret_paths: list[str] = field(default_factory=list)
    # Alias specs as registered: {"name", "type", "parentUrn", "noParent"} (unset fields empty).
    aliases: list[dict[str, Any]] = field(default_factory=list)
    # What an engine acts on beyond `dependencies`: which input each dependency flows into, and
    # the options that steer a replacement (None: the option is not set).
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)
    delete_before_replace: bool | None = None
    replace_on_changes: list[str] = field(default_factory=list)
    ignore_changes: list[str] = field(default_factory=list)
    deleted_with: str | None = None


@dataclass
class ProgramRun:
    resources: list[RecordedResource]
    outputs: dict[str, Any]
    error: BaseException | None = None

    def of_type(self, type_: str) -> list[RecordedResource]:
        return [r for r in self.resources if r.type == type_]

    def named(self, name: str) -> RecordedResource:
        matches = [r for r in self.resources if r.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} resources named {name!r}; names: {sorted(r.name for r in self.resources)}")
        return matches[0]

    def by_urn(self, urn: str) -> RecordedResource:
        return next(r for r in self.resources if r.urn == urn)

    def depends_on(self, resource: RecordedResource, other: RecordedResource) -> bool:
        """Whether `resource` waits for `other`, directly, through a component, or through a chain."""
        seen: set[str] = set()
        stack = [resource.urn]
        while stack:
            urn = stack.pop()
            if urn in seen:
                continue
            seen.add(urn)
            current = self.by_urn(urn)
            for dep in current.dependencies:
                if dep == other.urn or self._contains(dep, other.urn):
                    return True
                stack.append(dep)
        return False

    def _contains(self, component_urn: str, urn: str) -> bool:
        """A dependency on a component is a dependency on everything inside it."""
        parent = self.by_urn(urn).parent
        while parent:
            if parent == component_urn:
                return True
            parent = next((r.parent for r in self.resources if r.urn == parent), None)
        return False


def _unwrap_secrets(value: Any, path: str, secret_paths: list[str]) -> Any:
    if isinstance(value, dict):
        if pulumi_sdk.is_secret_wrapper(value):
            secret_paths.append(path)
            return _unwrap_secrets(value["value"], path, secret_paths)
        return {k: _unwrap_secrets(v, f"{path}.{k}" if path else k, secret_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap_secrets(v, f"{path}[{i}]", secret_paths) for i, v in enumerate(value)]
    return value


class ProgramMocks(pulumi.runtime.Mocks):
    """Fills what providers compute, as the real ones would."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        if args.typ == "docker:index/image:Image":
            digest = hashlib.sha256(state["imageName"].encode()).hexdigest()
            state["repoDigest"] = f"{state['imageName'].rsplit(':', 1)[0]}@sha256:{digest}"
        elif args.typ in ("command:remote:Command", "command:local:Command"):
            state["stdout"] = _command_stdout(args.name, state.get("create", ""))
            state["stderr"] = ""
        elif args.typ == "docker:index/remoteImage:RemoteImage":
            state["imageId"] = "sha256:" + hashlib.sha256(str(state["name"]).encode()).hexdigest()
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


def _command_stdout(name: str, create: str) -> str:
    if name.endswith("-healthy"):
        # A health gate prints the URL its server answers on (a blue-green copy's, the slot it took).
        return "http://127.0.0.1:8200\n"
    if name.endswith("-relay-key"):
        return "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMockRelayKeyForTests relay\n"
    if name.endswith("-push") and "docker push" in create:
        # The image relay's reference for what was pushed (components/image_distribution.py).
        return "127.0.0.1:5550/node@sha256:" + hashlib.sha256(create.encode()).hexdigest() + "\n"
    if name.endswith("-id") and "docker image inspect" in create:
        # Every host holds the same image: its ID follows from the reference alone.
        reference = create.rsplit(" ", 1)[-1].strip("'")
        return "sha256:" + hashlib.sha256(reference.encode()).hexdigest() + "\n"
    return ""


_registering = threading.local()


def current_registration() -> RecordedResource | None:
    """The resource whose registration this thread is answering, for mocks that act on its
    dependencies and options as an engine would (the SDK registers each one on its own thread)."""
    return getattr(_registering, "resource", None)


class RecordingMonitor(pulumi_sdk.MockMonitor):
    def __init__(self, mocks: pulumi.runtime.Mocks):
        super().__init__(mocks)
        self.recorded: list[RecordedResource] = []

    def RegisterResource(self, request):
        if request.type == "pulumi:pulumi:Stack":
            return super().RegisterResource(request)
        recorded = self._record(request)
        _registering.resource = recorded
        try:
            response = super().RegisterResource(request)
        finally:
            _registering.resource = None
        self.recorded.append(recorded)
        return response

    def _record(self, request) -> RecordedResource:
        secret_paths: list[str] = []
        raw = pulumi_sdk.deserialize_properties(request.object)
        inputs = _unwrap_secrets(raw, "", secret_paths)
        deps = set(request.dependencies)
        for prop in request.propertyDependencies.values():
            deps.update(prop.urns)
        # Read as the engine reads it (pkg/resource/deploy/source_eval.go): set when defined or true.
        delete_before_replace_set = request.deleteBeforeReplaceDefined or request.deleteBeforeReplace
        return RecordedResource(
            urn=self.make_urn(request.parent, request.type, request.name), type=request.type, name=request.name,
            inputs=inputs, parent=request.parent or None, dependencies=sorted(deps),
            provider=request.provider or None, custom=request.custom,
            retain_on_delete=request.retainOnDelete, secret_paths=secret_paths,
            aliases=[{"name": a.spec.name, "type": a.spec.type, "parentUrn": a.spec.parentUrn,
                      "noParent": a.spec.noParent} for a in request.aliases if a.HasField("spec")],
            property_dependencies={key: sorted(prop.urns) for key, prop in request.propertyDependencies.items()},
            delete_before_replace=request.deleteBeforeReplace if delete_before_replace_set else None,
            replace_on_changes=list(request.replaceOnChanges), ignore_changes=list(request.ignoreChanges),
            deleted_with=request.deletedWith or None,
        )


def stack_config(path: Path) -> dict[str, Any]:
    """A stack file's `vllm-dcu:` values, keys without the namespace."""
    import yaml

    values = yaml.safe_load(path.read_text()).get("config", {})
    prefix = f"{PROJECT}:"
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def run_program(
    config: dict[str, Any], stack: str = "test", secrets: dict[str, str] | None = None,
    mocks: pulumi.runtime.Mocks | None = None, program: Callable[[], Any] | None = None,
) -> ProgramRun:
    """Run __main__.py for `config` (keys without the namespace) under mocks.

    `mocks` replaces ProgramMocks: the e2e applier (tests/e2e/apply.py) passes mocks that create
    each resource for real and answer with its real outputs, as a provider would. `program`
    replaces __main__.py: a function that declares resources and returns the stack outputs.
    """
    monitor = RecordingMonitor(mocks or ProgramMocks())
    # The SDK's futures need the thread's current loop, which an earlier asyncio.run() in this process
    # (the runtime's tests) leaves unset.
    try:
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())
    # Fresh settings (set_mocks keeps the last run's outputs, a failed run's failures among them).
    pulumi_sdk.reset_settings()
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    values = {f"{PROJECT}:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    values.update({f"{PROJECT}:{k}": v for k, v in (secrets or {}).items()})
    pulumi.runtime.set_all_config(values, secret_keys=[f"{PROJECT}:{k}" for k in (secrets or {})])
    outputs: dict[str, Any] = {}

    def main() -> Any:
        return runpy.run_path(str(REPO / "__main__.py"), run_name="__main__")["deployment"].outputs

    async def run() -> None:
        resolved = await pulumi.Output.from_input((program or main)()).future()
        outputs.update(resolved or {})

    error: BaseException | None = None
    asyncio.get_event_loop().set_exception_handler(_report_unless_reported)
    try:
        pulumi_sdk.run_program_function(run)
    except BaseException as exc:  # noqa: BLE001 - the test decides what a failure means
        error = exc
        _reported.extend(_chain(exc))
    return ProgramRun(monitor.recorded, outputs, error)


# The SDK resolves every output of a failed resource with its error, and asyncio reports each one
# nobody awaited as "never retrieved" when it is collected; the run reports that error once.
_reported: list[BaseException] = []


def _chain(error: BaseException | None):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # the SDK raises errors "from" themselves
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _report_unless_reported(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    if "never retrieved" in context.get("message", "") and any(context.get("exception") is e for e in _reported):
        return
    loop.default_exception_handler(context)
