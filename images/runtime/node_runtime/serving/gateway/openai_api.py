"""OpenAI-compatible /v1/*: routed by `model`, bodies and streams passed through.

Routed by the table of routes.py: the POSTs take the fast path, GET /v1/models is a FastAPI route.
The gateway reads only what it must (model, stream, n, and for chat `messages`) and refuses what
vLLM would fail on unexplained; a replica's refusal comes back in our error shape, its status kept.
"""

import json

from fastapi.responses import JSONResponse
from starlette.responses import Response

from node_runtime.serving.gateway.errors import LONE_SURROGATE, GatewayError
from node_runtime.serving.gateway.rejections import rejection
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.upstream import pass_through, route

CHAT = "/v1/chat/completions"


async def models(state: GatewayState, scope: dict, body: bytes) -> Response:
    key = scope.get("state", {}).get("key")
    served = state.config.models if key is None or key.models is None else key.models
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "owned_by": "node-runtime"} for name in served
    ]})


def invalid(field: str, problem: str) -> GatewayError:
    return GatewayError(422, f"{field}: {problem}", param=field, code="invalid_request")


def lone_surrogate(value, path: str = "") -> str | None:
    """The first field holding half of a surrogate pair, which vLLM's tokenizer fails on."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        return next(filter(None, (lone_surrogate(v, f"{path}.{k}" if path else k) for k, v in value.items())), None)
    elif isinstance(value, list):
        return next(filter(None, (lone_surrogate(v, f"{path}[{i}]") for i, v in enumerate(value))), None)
    return None


def request_payload(state: GatewayState, path: str, body: bytes) -> dict:
    """The body as JSON, with the fields the gateway acts on checked; 422 naming the field otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as bad:
        raise GatewayError(422, f"request body is not valid JSON: {bad}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise GatewayError(422, "request body must be a JSON object", code="invalid_json")
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        raise invalid("model", "must be a string")
    if payload.get("stream") is not None and not isinstance(payload["stream"], bool):
        raise invalid("stream", "must be true or false")
    n = payload.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise invalid("n", "must be an integer")
    if n is not None and n > state.config.max_n:
        raise invalid("n", f"{n} sequences is more than this gateway's limit of {state.config.max_n} (stack key maxN)")
    if path == CHAT and not (isinstance(payload.get("messages"), list) and payload["messages"]):
        raise invalid("messages", "must be a non-empty list of messages")
    if (b"\\ud" in body or b"\\uD" in body) and (field := lone_surrogate(payload)):  # a JSON escape may make one
        raise invalid(field, LONE_SURROGATE)
    return payload


def asking_usage(payload: dict, body: bytes) -> tuple[bytes, bool]:
    """A stream's body asking vLLM for its usage (RelayedStream reads it), and whether the client asked
    for it itself. Without stream_options, the client's bytes get it spliced in front, else re-written."""
    options = payload.get("stream_options")
    if "stream_options" not in payload:
        return b'{"stream_options":{"include_usage":true},' + body[body.index(b"{") + 1:], False
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, True
    if options is None or isinstance(options, dict):
        return json.dumps({**payload, "stream_options": {**(options or {}), "include_usage": True}}).encode(), False
    return body, True  # not an object: vLLM refuses it, in its words


def asked_tokens(payload: dict) -> int | None:
    """The most tokens the request may generate, if it says (max_tokens; chat's newer max_completion_tokens)."""
    for field in ("max_tokens", "max_completion_tokens"):
        tokens = payload.get(field)
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
            return tokens
    return None


async def forward(state: GatewayState, scope: dict, body: bytes) -> Response:
    """POST /v1/completions and /v1/chat/completions: to the same path on a replica of the model."""
    path = scope["path"]
    payload = request_payload(state, path, body)
    model = route(state, scope, payload.get("model"))
    stream, relay_usage = payload.get("stream") is True, True
    if stream and state.keys.required:  # tokens are counted per key (Keys.charge)
        body, relay_usage = asking_usage(payload, body)

    def refused(status: int, content: bytes) -> GatewayError:
        return rejection(status, content, prompt_field="messages" if path == CHAT else "prompt", sent=frozenset(payload))

    return await pass_through(state, scope, model, path, body, stream=stream, refused=refused, relay_usage=relay_usage,
                              tokens=asked_tokens(payload))
