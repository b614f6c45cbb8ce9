"""Talking to the model servers: routing by model and pass-through.

The upstream client is aiohttp's, not httpx (which STYLE.md suggests); measured evidence overrides
the style guide here. Against a fixed-answer upstream on the same machine, swapping httpx's
AsyncClient for aiohttp's alone took this gateway's added p50 from 1.08 ms to 0.48 ms (the issue's
budget is 0.5 ms), and a bare FastAPI proxy shows the same gap (httpx 0.9-1.0 ms, aiohttp ~0.4 ms);
with the smaller savings elsewhere in this package, the gateway's CPU time per request over the
whole benchmark fell from 1.5 ms to 0.42 ms.
bench/gateway/RESULTS.md has the figures and the command.
"""

import asyncio
import random
from contextlib import contextmanager

import aiohttp
from fastapi.responses import Response, StreamingResponse

from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.metrics import UPSTREAM_ERRORS
from node_runtime.serving.spec import UpstreamServer

# Hop-by-hop headers belong to one connection; date and server are the gateway's own (uvicorn's).
NOT_RELAYED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "date", "server",
})
HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
# Below the model server's own idle keep-alive (uvicorn's 5 s in vLLM), so the gateway never sends
# on a connection the server is about to close.
KEEPALIVE_S = 4.0


def upstream_session(request_timeout_s: float) -> aiohttp.ClientSession:
    """One pooled HTTP/1.1 keep-alive session for every model server.

    No connection limit: /batch_generate sends up to max_batch_size requests at once, by design.
    `sock_read` bounds the wait for each next byte (a stream may run long, a stall may not); bodies
    are relayed exactly as sent, so nothing is decompressed and no compression is asked for.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=request_timeout_s),
        auto_decompress=False, skip_auto_headers=("Accept-Encoding",),
    )


def base_url(server: UpstreamServer) -> str:
    return str(server.url).rstrip("/")


def pick_server(servers: dict[str, UpstreamServer], model: str | None) -> UpstreamServer:
    """The server for a request's `model`; it may be left out only when one model is served."""
    served = ", ".join(servers)
    if model is None:
        if len(servers) == 1:
            return next(iter(servers.values()))
        raise GatewayError(422, f"model is required when several models are served: {served}", param="model",
                           code="model_required")
    try:
        return servers[model]
    except KeyError:
        raise GatewayError(404, f"model '{model}' is not served here; served models: {served}", param="model",
                           code="model_not_found") from None


def route(state, scope: dict, model: str | None) -> UpstreamServer:
    """pick_server, noting the model in the scope: RequestMetricsMiddleware labels the request by it."""
    server = pick_server(state.servers, model)
    scope.setdefault("state", {})["model"] = server.name
    return server


@contextmanager
def upstream_errors(server: UpstreamServer):
    """A model server that cannot be reached is a 503, a slow one a 504."""
    try:
        yield
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as down:
        UPSTREAM_ERRORS.labels(server.name, "unreachable").inc()
        raise GatewayError(503, f"model server for '{server.name}' is not reachable ({type(down).__name__}): "
                                "it may be starting or down; see /health", code="model_unavailable") from None
    except asyncio.TimeoutError as slow:
        UPSTREAM_ERRORS.labels(server.name, "timeout").inc()
        raise GatewayError(504, f"model server for '{server.name}' did not answer in time ({type(slow).__name__}); "
                                "retry, or raise request_timeout_s", code="model_timeout") from None
    except aiohttp.ClientError as broken:
        UPSTREAM_ERRORS.labels(server.name, "protocol").inc()
        raise GatewayError(503, f"model server for '{server.name}' failed mid-request ({type(broken).__name__}); "
                                "see /health", code="model_unavailable") from None


def header(scope: dict, name: bytes) -> str | None:
    """A request header straight from the ASGI scope (whose names arrive lower-cased)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def request_id(scope: dict) -> str:
    """The client's X-Request-Id, else a new one: random enough to be unique, not a secret (no urandom call)."""
    rid = scope.get("request_id")
    if rid is None:
        rid = scope["request_id"] = header(scope, b"x-request-id") or f"{random.getrandbits(128):032x}"
    return rid


async def post_upstream(session: aiohttp.ClientSession, scope: dict, server: UpstreamServer, path: str, body: bytes,
                        *, stream: bool = False) -> tuple[aiohttp.ClientResponse, bytes | None]:
    """POST a JSON body to a model server: (response, its whole body), or (open response, None) for a stream."""
    headers = {"content-type": "application/json", "accept": header(scope, b"accept") or "*/*",
               "x-request-id": request_id(scope)}
    with upstream_errors(server):
        response = await session.post(base_url(server) + path, data=body, headers=headers)
        if stream:
            return response, None
        return response, await response.read()


async def _relay(response: aiohttp.ClientResponse, server: UpstreamServer):
    """Chunks as they arrive; the upstream connection is freed (or dropped, if unread) whatever happens.

    A failure mid-stream cannot become an error answer any more (the status line is sent): it is
    counted and the client's connection is dropped, so a cut stream never looks complete.
    """
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, asyncio.TimeoutError):
        UPSTREAM_ERRORS.labels(server.name, "stream_broken").inc()
        raise
    finally:
        response.release()


async def pass_through(session: aiohttp.ClientSession, scope: dict, server: UpstreamServer, path: str, body: bytes,
                       *, stream: bool) -> Response:
    """Forward the client's bytes unchanged; a stream (SSE) goes back chunk by chunk as it comes.

    A non-streaming answer is relayed in one piece: same bytes, fewer writes than a stream.
    """
    response, content = await post_upstream(session, scope, server, path, body, stream=stream)
    if response.status >= 500:
        UPSTREAM_ERRORS.labels(server.name, "http_5xx").inc()
    headers = {name: value for name, value in response.headers.items() if name.lower() not in NOT_RELAYED}
    headers["x-request-id"] = request_id(scope)
    if content is not None:
        return Response(content, status_code=response.status, headers=headers)
    return StreamingResponse(_relay(response, server), status_code=response.status, headers=headers)
