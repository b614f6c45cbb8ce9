"""/, /health and /metrics: open to everyone, no API key. Their handlers run as FastAPI routes (routes.py)."""

import asyncio

import aiohttp
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from node_runtime import __version__
from node_runtime.serving.gateway.health import server_problem
from node_runtime.serving.gateway.metrics import UPSTREAM_ERRORS, gateway_metrics, relabel_vllm_metrics
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.upstream import HEALTH_TIMEOUT, base_url


async def health_report(state: GatewayState) -> tuple[bool, dict]:
    servers = list(state.servers.values())
    *problems, cluster = await asyncio.gather(
        *(server_problem(state.client, server) for server in servers), state.cluster.report()
    )
    models = {server.name: problem or "ok" for server, problem in zip(servers, problems)}
    unhealthy = [f"model {name}: {status}" for name, status in models.items() if status != "ok"]
    if cluster.problem:
        unhealthy.append(f"ray cluster: {cluster.problem}")
    return not unhealthy, {"models": models, "cluster": cluster.as_json(state.config.cluster), "unhealthy": unhealthy}


async def index(state: GatewayState, scope: dict, body: bytes) -> Response:
    healthy, report = await health_report(state)
    return JSONResponse({
        "service": "node-runtime gateway",
        "version": __version__,
        "status": "ok" if healthy else "degraded",
        **report,
        "endpoints": list(state.endpoints),
    })


async def health(state: GatewayState, scope: dict, body: bytes) -> Response:
    healthy, report = await health_report(state)
    return JSONResponse({"status": "ok" if healthy else "unhealthy", **report}, status_code=200 if healthy else 503)


async def _server_metrics(session: aiohttp.ClientSession, name: str, url: str) -> str | None:
    try:
        async with session.get(url + "/metrics", timeout=HEALTH_TIMEOUT, raise_for_status=True) as response:
            return await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        UPSTREAM_ERRORS.labels(name, "metrics").inc()
        return None


async def metrics(state: GatewayState, scope: dict, body: bytes) -> Response:
    """Not an ASGI mount: each scrape also fetches every model server's own metrics."""
    texts = await asyncio.gather(*(_server_metrics(state.client, name, base_url(server)) for name, server in state.servers.items()))
    by_model = {name: text for name, text in zip(state.servers, texts) if text is not None}
    return Response(gateway_metrics() + relabel_vllm_metrics(by_model), media_type=CONTENT_TYPE_LATEST)
