"""Talking to the model servers: routing by model, pass-through, health, and the cluster's state."""

import asyncio
import time
import uuid
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from node_runtime.serving.cluster import ClusterState, ClusterUnreachable, probe_async
from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.metrics import UPSTREAM_ERRORS
from node_runtime.serving.spec import ClusterSpec, UpstreamServer

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade",
})
HEALTH_TIMEOUT_S = 5.0


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


async def send_upstream(client: httpx.AsyncClient, request: httpx.Request, server: UpstreamServer,
                        *, stream: bool = False) -> httpx.Response:
    """Send one request to a model server; a down server is a 503, a slow one a 504."""
    try:
        return await client.send(request, stream=stream)
    except (httpx.ConnectError, httpx.ConnectTimeout) as down:
        UPSTREAM_ERRORS.labels(server.name, "unreachable").inc()
        raise GatewayError(503, f"model server for '{server.name}' is not reachable ({type(down).__name__}): "
                                "it may be starting or down; see /health", code="model_unavailable") from None
    except httpx.TimeoutException as slow:
        UPSTREAM_ERRORS.labels(server.name, "timeout").inc()
        raise GatewayError(504, f"model server for '{server.name}' did not answer in time ({type(slow).__name__}); "
                                "retry, or raise request_timeout_s", code="model_timeout") from None
    except httpx.HTTPError as broken:
        UPSTREAM_ERRORS.labels(server.name, "protocol").inc()
        raise GatewayError(503, f"model server for '{server.name}' failed mid-request ({type(broken).__name__}); "
                                "see /health", code="model_unavailable") from None


def request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


async def pass_through(request: Request, server: UpstreamServer, path: str, body: bytes, *, stream: bool) -> Response:
    """Forward the client's bytes unchanged; a stream (SSE) goes back chunk by chunk as it comes.

    A non-streaming answer is relayed in one piece: same bytes, fewer writes than a stream.
    """
    client: httpx.AsyncClient = request.app.state.client
    rid = request_id(request)
    upstream_request = client.build_request(
        "POST", base_url(server) + path, content=body,
        headers={"content-type": "application/json", "accept": request.headers.get("accept", "*/*"), "x-request-id": rid},
    )
    response = await send_upstream(client, upstream_request, server, stream=stream)
    if response.status_code >= 500:
        UPSTREAM_ERRORS.labels(server.name, "http_5xx").inc()
    headers = {name: value for name, value in response.headers.items() if name.lower() not in HOP_BY_HOP}
    headers["x-request-id"] = rid
    if not stream:
        return Response(response.content, status_code=response.status_code, headers=headers)
    return StreamingResponse(response.aiter_raw(), status_code=response.status_code, headers=headers,
                             background=BackgroundTask(response.aclose))


async def server_problem(client: httpx.AsyncClient, server: UpstreamServer) -> str | None:
    """None when the server's own /health answers 200, else what is wrong."""
    try:
        response = await client.get(base_url(server) + "/health", timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError as error:
        return f"not reachable ({type(error).__name__})"
    return None if response.status_code == 200 else f"its /health answered {response.status_code}"


@dataclass(frozen=True)
class ClusterReport:
    state: ClusterState | None
    problem: str | None

    def as_json(self, spec: ClusterSpec) -> dict:
        return {
            "ray_address": spec.ray_address,
            "nodes_alive": self.state.nodes if self.state else None,
            "nodes_expected": spec.expected_nodes,
            "gpus": self.state.gpus if self.state else None,
            "gpus_expected": spec.expected_gpus,
            "problem": self.problem,
        }


class ClusterMonitor:
    """The Ray cluster's state, probed at most once per `ttl_s` however often /health is asked."""

    def __init__(self, spec: ClusterSpec, ttl_s: float = 10.0, probe_timeout_s: float = 20.0):
        self.spec = spec
        self.ttl_s = ttl_s
        self.probe_timeout_s = probe_timeout_s
        self._report: ClusterReport | None = None
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()

    async def report(self) -> ClusterReport:
        async with self._lock:
            if time.monotonic() - self._checked_at >= self.ttl_s:
                self._report = await self._probe()
                self._checked_at = time.monotonic()
            return self._report

    async def _probe(self) -> ClusterReport:
        try:
            state = await probe_async(self.spec.ray_address, self.probe_timeout_s)
        except ClusterUnreachable as error:
            return ClusterReport(None, str(error))
        return ClusterReport(state, state.shortfall(self.spec))
