"""Who is asking: the clients' API keys, what each may use, and what each used.

The secrets come from env only (cli.py): the single NODE_RUNTIME_API_KEY, named `default`, and the
named keys of NODE_RUNTIME_API_KEYS (a JSON object, name -> secret), whose models and limits are the
config's `api_keys`. Everywhere else (/metrics, the access log, errors) a key is its name.

A sent key is looked up by its SHA-256: one dict lookup however many keys, and no comparison whose
time depends on how much of a secret a guess got right.
"""

import hashlib
import json
from dataclasses import dataclass

from node_runtime.serving.gateway.config import NO_KEY, SINGLE_KEY, KeyPolicy
from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.limits import Limiter


@dataclass(frozen=True)
class Key:
    name: str
    models: tuple[str, ...] | None = None  # None: every served model
    slot: int | None = None  # its buckets in the Limiter, when it has a limit
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


ANONYMOUS = Key(NO_KEY)


class KeysError(ValueError):
    """The keys from env do not match the config's `api_keys` (a message naming names, never secrets)."""


def parse_named_keys(raw: str | None) -> dict[str, str]:
    """NODE_RUNTIME_API_KEYS: {"name": "secret", ...}; empty or unset: none."""
    if not raw:
        return {}
    try:
        named = json.loads(raw)
    except ValueError:
        raise KeysError("NODE_RUNTIME_API_KEYS is not valid JSON: it must be an object of key name -> secret") from None
    if not isinstance(named, dict) or not all(isinstance(v, str) and v for v in named.values()):
        raise KeysError("NODE_RUNTIME_API_KEYS must be a JSON object of key name -> non-empty secret")
    return named


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Keys:
    """identify() a request's key; admit() it against its limits; charge() its tokens."""

    def __init__(self, single: str | None, named: dict[str, str], policies: list[KeyPolicy],
                 shared_dir: str | None = None):
        declared = {policy.name for policy in policies}
        if set(named) != declared:
            missing, unknown = sorted(declared - set(named)), sorted(set(named) - declared)
            raise KeysError("NODE_RUNTIME_API_KEYS and the config's api_keys name different keys: "
                            + "; ".join(filter(None, [missing and f"no secret for {', '.join(missing)}",
                                                      unknown and f"not in api_keys: {', '.join(unknown)}"])))
        self._by_digest: dict[bytes, Key] = {}
        if single:
            self._add(single, Key(SINGLE_KEY))
        limited = [policy for policy in policies if policy.requests_per_minute or policy.tokens_per_minute]
        for policy in policies:
            slot = limited.index(policy) if policy in limited else None
            self._add(named[policy.name], Key(policy.name, tuple(policy.models) if policy.models else None, slot,
                                              policy.requests_per_minute, policy.tokens_per_minute))
        self.required = bool(self._by_digest)
        self.limiter = Limiter(len(limited), shared_dir) if limited else None

    def _add(self, secret: str, key: Key) -> None:
        if _digest(secret) in self._by_digest:
            raise KeysError(f"keys {self._by_digest[_digest(secret)].name} and {key.name} have the same secret")
        self._by_digest[_digest(secret)] = key

    def identify(self, authorization: str | None) -> Key:
        """The key sent as 'Bearer <secret>'; ANONYMOUS when no key is configured; 401 otherwise."""
        if not self.required:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        key = self._by_digest.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if key is None:
            raise GatewayError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return key

    def admit(self, authorization: str | None, scope: dict) -> Key:
        """identify(), noted in the scope (for /metrics and the access log), then the key's limits: 401, 429."""
        state = scope.setdefault("state", {})
        state["key"] = ANONYMOUS  # counted as no key should this raise
        if not self.required:
            return ANONYMOUS
        key = state["key"] = self.identify(authorization)
        if key.slot is not None:
            self.limiter.admit(key.slot, key.name, key.requests_per_minute, key.tokens_per_minute)
        return key

    def charge(self, scope: dict, prompt_tokens: int, completion_tokens: int) -> None:
        """A request's usage, noted in the scope and taken from its key's tokens per minute. Tokens are
        counted per key only when the gateway has keys (`required`): without, the replicas' own
        vllm:prompt_tokens and vllm:generation_tokens count them, and no request pays to read them."""
        if not self.required:
            return
        state = scope["state"]
        state["usage"] = (prompt_tokens, completion_tokens)
        key = state.get("key")
        if key is not None and key.tokens_per_minute is not None:
            self.limiter.charge(key.slot, key.tokens_per_minute, prompt_tokens + completion_tokens)


def sees_internals(keys: Keys, authorization: str | None) -> bool:
    """Whether / and /health may show internal addresses: to anyone without keys, else to a key holder."""
    try:
        keys.identify(authorization)
    except GatewayError:
        return False
    return True
