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


# Named API keys: one secret holding a list of {name, key, models, requestsPerMinute, tokensPerMinute}.
# The values (`key`) are checked here and go on as a Pulumi secret (Secrets.api_keys); the rest is
# validated with the stack (StackConfig.api_keys), which never holds a value.
API_KEYS = "apiKeys"
MIN_KEY_LENGTH = 16


def _without_key_values(entries: Any) -> tuple[Any, list[str]]:
    """apiKeys as StackConfig validates it, and the problems of its values: each names the entry, never the value."""
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        return entries, []  # StackConfig names the problem
    problems, seen = [], {}
    for i, entry in enumerate(entries):
        value, where = entry.get("key"), f"{API_KEYS}[{i}].key"
        if not isinstance(value, str) or not value:
            problems.append(f"{where}: required: the secret clients send as 'Authorization: Bearer <key>'")
        elif len(value) < MIN_KEY_LENGTH or any(c.isspace() for c in value):
            problems.append(f"{where}: use at least {MIN_KEY_LENGTH} characters and no spaces, e.g. `openssl rand -hex 24`")
        elif value in seen:
            problems.append(f"{where}: the same value as {API_KEYS}[{seen[value]}].key; give each key its own")
        else:
            seen[value] = i
    return [{k: v for k, v in entry.items() if k != "key"} for entry in entries], problems


def parse_stack_config(values: dict[str, Any]) -> StackConfig:
    """Validate a stack's `vllm-dcu:*` values (already parsed from YAML/JSON; apiKeys with its values)."""
    values, problems = dict(values), []
    if API_KEYS in values:
        values[API_KEYS], key_problems = _without_key_values(values[API_KEYS])
        problems += [f"{PROJECT}:{p}" for p in key_problems]
    try:
        config = StackConfig.model_validate(values)
    except ValidationError as error:
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown key; check its spelling against the README's config reference"
            elif item["type"] == "missing":
                message = "required; set it in the stack file"
            problems.append(f"{PROJECT}:{_stack_key(item['loc'])}: {message}")
        raise ConfigError(problems) from None
    problems += [f"{PROJECT}:{p}" for p in stack_problems(config)]
    if problems:
        raise ConfigError(problems)
    return config


# Secrets travel as Pulumi secrets (Outputs), so they stay out of the plain model above (apiKeys
# without its values is validated there too).
SECRET_KEYS = ("sshPrivateKey", "hfToken", "modelscopeToken", "apiKey", API_KEYS)


@dataclass(frozen=True)
class Secrets:
    ssh_private_key: Any = None
    hf_token: Any = None
    modelscope_token: Any = None
    api_key: Any = None
    api_keys: Any = None  # the JSON list of apiKeys, values included


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
        if key == API_KEYS and not runtime_config.is_config_secret(full_key):
            raise ConfigError([f"{full_key}: holds API key values in plain text; set it as a secret: "
                               f"pulumi config set --secret {full_key} '[{{\"name\": ..., \"key\": ...}}]'"])
        if (key not in SECRET_KEYS or key == API_KEYS) and value != "":
            values[key] = value
    config = parse_stack_config(values)
    single = runtime_config.get_config(f"{prefix}apiKey")
    if single and any(entry.get("key") == single for entry in values.get(API_KEYS, [])):
        raise ConfigError([f"{prefix}{API_KEYS}: a key has the same value as apiKey; give each key its own"])
    for warning in stack_warnings(config):
        pulumi.log.warn(f"{PROJECT}:{warning}")
    stack = pulumi.Config(PROJECT)
    secrets = Secrets(*(stack.get_secret(key) for key in SECRET_KEYS))
    return config, secrets
