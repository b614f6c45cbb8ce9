"""/, /health and /metrics: open to everyone, no API key."""

import asyncio

import aiohttp
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from node_runtime import __version__
from node_runtime.serving.gateway.metrics import UPSTREAM_ERRORS, gateway_metrics, relabel_vllm_metrics
from node_runtime.serving.gateway.upstream import HEALTH_TIMEOUT, base_url, server_problem

router = APIRouter()


async def health_report(request: Request) -> tuple[bool, dict]:
    state = request.app.state
    servers = list(state.servers.values())
    *problems, cluster = await asyncio.gather(
        *(server_problem(state.client, server) for server in servers), state.cluster.report()
    )
    models = {server.name: problem or "ok" for server, problem in zip(servers, problems)}
    unhealthy = [f"model {name}: {status}" for name, status in models.items() if status != "ok"]
    if cluster.problem:
        unhealthy.append(f"ray cluster: {cluster.problem}")
    return not unhealthy, {"models": models, "cluster": cluster.as_json(state.config.cluster), "unhealthy": unhealthy}


@router.get("/")
async def index(request: Request):
    healthy, report = await health_report(request)
    return {
        "service": "node-runtime gateway",
        "version": __version__,
        "status": "ok" if healthy else "degraded",
        **report,
        "endpoints": ["/", "/generate", "/batch_generate", "/health", "/metrics",
                      "/v1/models", "/v1/completions", "/v1/chat/completions"],
    }


@router.get("/health")
async def health(request: Request):
    healthy, report = await health_report(request)
    return JSONResponse({"status": "ok" if healthy else "unhealthy", **report}, status_code=200 if healthy else 503)


async def _server_metrics(session: aiohttp.ClientSession, name: str, url: str) -> str | None:
    try:
        async with session.get(url + "/metrics", timeout=HEALTH_TIMEOUT, raise_for_status=True) as response:
            return await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        UPSTREAM_ERRORS.labels(name, "metrics").inc()
        return None


@router.get("/metrics")
async def metrics(request: Request):
    """Not an ASGI mount: each scrape also fetches every model server's own metrics."""
    state = request.app.state
    texts = await asyncio.gather(*(_server_metrics(state.client, name, base_url(server)) for name, server in state.servers.items()))
    by_model = {name: text for name, text in zip(state.servers, texts) if text is not None}
    return Response(gateway_metrics() + relabel_vllm_metrics(by_model), media_type=CONTENT_TYPE_LATEST)
