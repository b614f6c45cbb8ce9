"""The Pulumi Python SDK's internals the mock harness (tests/support/pulumi_program.py) relies on, in
one place: nothing else in the tests reaches past the SDK's public API.

Written against pulumi 3.272.0, the version requirements.txt pins exactly: these are private modules
and attributes (pulumi.runtime.mocks.MockMonitor, rpc.deserialize_properties and its secret signature,
settings.reset_options, stack.run_pulumi_func, sync_await._sync_await) that may change in any release. When raising the pin,
run tests/unit and tests/e2e/test_e2e_applier*.py, and fix what breaks here.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from pulumi.runtime import mocks as _mocks
from pulumi.runtime import rpc as _rpc
from pulumi.runtime.settings import reset_options as _reset_options
from pulumi.runtime.stack import run_pulumi_func as _run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

SDK_VERSION = "3.272.0"  # keep equal to requirements.txt's pin

# The SDK's in-process resource monitor for mocks: subclassed to see each RegisterResource request
# (a pulumirpc RegisterResourceRequest, the engine protocol's message) before it is answered.
MockMonitor = _mocks.MockMonitor


def deserialize_properties(struct: Any) -> dict[str, Any]:
    """A request's protobuf Struct of properties as Python values, each secret kept as the SDK's
    internal wrapper (a dict with its signature key and "value"; see is_secret_wrapper)."""
    return _rpc.deserialize_properties(struct, keep_internal=True)


def is_secret_wrapper(value: Any) -> bool:
    """Whether a deserialized value is a secret's wrapper, its plain value under "value"."""
    return isinstance(value, dict) and value.get(_rpc._special_sig_key) == _rpc._special_secret_sig


def reset_settings() -> None:
    """Fresh runtime settings: set_mocks alone keeps the previous run's outputs and failures."""
    _reset_options()


def run_program_function(function: Callable[[], Awaitable[None]]) -> None:
    """Run `function` as the SDK runs a program (waiting for every registration it started), to
    the end, on the current thread's event loop."""
    _sync_await(_run_pulumi_func(function))
