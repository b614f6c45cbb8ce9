"""Reading the stack's configuration: Pulumi's values in, one validated StackConfig out.

Components never read `pulumi.Config`; `load_stack_config` does, once, and every invalid value
stops the program here — before anything is created — with one line per problem that names the
stack key and says how to fix it. The keys' types are components/schema.py, the checks that need
the whole stack components/checks.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.runtime import config as runtime_config
from pydantic import ValidationError

from components.checks import stack_problems, stack_warnings
from components.schema import PROJECT, StackConfig


class ConfigError(Exception):
    """Invalid stack configuration; `problems` holds one line per offending key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid stack configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _stack_key(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for a dict key that failed: the key itself is the last part
            continue
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def parse_stack_config(values: dict[str, Any]) -> StackConfig:
    """Validate a stack's `vllm-dcu:*` values (already parsed from YAML/JSON)."""
    try:
        config = StackConfig.model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown key; check its spelling against the README's config reference"
            elif item["type"] == "missing":
                message = "required; set it in the stack file"
            problems.append(f"{PROJECT}:{_stack_key(item['loc'])}: {message}")
        raise ConfigError(problems) from None
    if problems := stack_problems(config):
        raise ConfigError([f"{PROJECT}:{p}" for p in problems])
    return config


# Secrets travel as Pulumi secrets (Outputs), so they stay out of the plain model above.
SECRET_KEYS = ("sshPrivateKey", "hfToken", "modelscopeToken", "apiKey")


@dataclass(frozen=True)
class Secrets:
    ssh_private_key: Any = None
    hf_token: Any = None
    modelscope_token: Any = None
    api_key: Any = None


def _stack_value(raw: Any) -> Any:
    """Pulumi hands values over as strings; objects and lists arrive as JSON; "" means unset."""
    if isinstance(raw, str) and raw[:1] in ("{", "["):
        return json.loads(raw)
    return raw


def load_stack_config() -> tuple[StackConfig, Secrets]:
    """Read and validate this stack's `vllm-dcu:*` configuration; raise ConfigError if invalid.

    Every key the stack sets is read (not only the known ones), so a misspelled key is refused by
    name; the SDK has no public listing of the keys, hence its runtime config module.
    """
    prefix = f"{PROJECT}:"
    keys = {k for k in (*runtime_config.CONFIG.get(), *runtime_config.get_config_env()) if k.startswith(prefix)}
    values = {}
    for full_key in sorted(keys):
        key = full_key.removeprefix(prefix)
        value = _stack_value(runtime_config.get_config(full_key))
        if key not in SECRET_KEYS and value != "":
            values[key] = value
    config = parse_stack_config(values)
    for warning in stack_warnings(config):
        pulumi.log.warn(f"{PROJECT}:{warning}")
    stack = pulumi.Config(PROJECT)
    secrets = Secrets(*(stack.get_secret(key) for key in SECRET_KEYS))
    return config, secrets
