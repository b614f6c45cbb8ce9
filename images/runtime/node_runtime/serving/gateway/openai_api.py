"""OpenAI-compatible /v1/*: routed by `model`, bodies and streams passed through untouched.

Routed by the table of routes.py: the POSTs take the fast path, GET /v1/models is a FastAPI route.
"""

import json

from fastapi.responses import JSONResponse
from starlette.responses import Response

from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.upstream import pass_through, route


async def models(state: GatewayState, scope: dict, body: bytes) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "owned_by": "node-runtime"} for name in state.config.models
    ]})


def routing_fields(body: bytes) -> tuple[str | None, bool]:
    """(model, stream): only what routing needs is read; the body goes on as the client sent it."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as bad:
        raise GatewayError(422, f"request body is not valid JSON: {bad}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise GatewayError(422, "request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise GatewayError(422, "model: must be a string", param="model", code="invalid_request")
    return model, payload.get("stream") is True


async def forward(state: GatewayState, scope: dict, body: bytes) -> Response:
    """POST /v1/completions and /v1/chat/completions: to the same path on a replica of the model."""
    model, stream = routing_fields(body)
    return await pass_through(state, scope, route(state, scope, model), scope["path"], body, stream=stream)
