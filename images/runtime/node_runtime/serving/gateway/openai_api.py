"""OpenAI-compatible /v1/*: routed by `model`, bodies and streams passed through untouched."""

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from node_runtime.serving.gateway.auth import require_api_key
from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.upstream import pass_through, pick_server

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


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


async def _route(request: Request, path: str):
    body = await request.body()
    model, stream = routing_fields(body)
    server = pick_server(request.app.state.servers, model)
    request.state.model = server.name
    return await pass_through(request, server, path, body, stream=stream)


@router.post("/completions")
async def completions(request: Request):
    return await _route(request, "/v1/completions")


@router.post("/chat/completions")
async def chat_completions(request: Request):
    return await _route(request, "/v1/chat/completions")


@router.get("/models")
async def models(request: Request):
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "owned_by": "node-runtime"} for name in request.app.state.servers
    ]})
