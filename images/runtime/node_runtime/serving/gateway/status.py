"""/, /health and /metrics: open to everyone, no API key. Their handlers run as FastAPI routes (routes.py).

/ and /health read what the background checks found (health.py): asking them sends nothing to the
replicas. They are this worker's view; /metrics sums every worker's.
"""

import asyncio

import aiohttp
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from node_runtime import __version__
from node_runtime.serving.gateway.health import CHECK_TIMEOUT
from node_runtime.serving.gateway.metrics import gateway_metrics, relabel_vllm_metrics
from node_runtime.serving.gateway.replicas import Replica
from node_runtime.serving.gateway.state import GatewayState


def model_status(replicas: list[Replica]) -> str:
    healthy = sum(replica.state == "healthy" for replica in replicas)
    if not replicas:
        return "unavailable: no replica is routed"
    if not healthy:
        return "unavailable: no healthy replica"
    return "ok" if healthy == len(replicas) else f"degraded: {healthy} of {len(replicas)} replicas healthy"


async def health_report(state: GatewayState) -> tuple[int, dict]:
    """(HTTP status, report): 503 only when a model has no healthy replica; a replica down, or Ray short
    of nodes or GPUs, is `degraded`."""
    cluster = await state.cluster.report()
    models, replicas, degraded, unhealthy = {}, {}, [], []
    for model in state.config.models:
        routed = state.pools.routed(model)
        models[model] = model_status(routed)
        if models[model].startswith("unavailable"):
            unhealthy.append(f"model {model}: {models[model].removeprefix('unavailable: ')}")
        degraded += [f"replica {replica.describe()}" for replica in routed if replica.state != "healthy"]
    for replica in sorted([*state.pools.replicas.values(), *state.pools.draining], key=lambda r: (r.model, r.id)):
        replicas[replica.id] = {"model": replica.model, "node": replica.node, "state": replica.state,
                                "problem": replica.problem, "in_flight": replica.in_flight}
    if cluster.problem:
        degraded.append(f"ray cluster: {cluster.problem}")
    status = "unhealthy" if unhealthy else "degraded" if degraded else "ok"
    return 503 if unhealthy else 200, {
        "status": status, "models": models, "replicas": replicas, "cluster": cluster.as_json(state.config.cluster),
        "degraded": degraded, "unhealthy": unhealthy,
    }


async def index(state: GatewayState, scope: dict, body: bytes) -> Response:
    _, report = await health_report(state)
    for replica in [*state.pools.replicas.values(), *state.pools.draining]:
        report["replicas"][replica.id].update(url=replica.url, requests=replica.requests, errors=replica.errors)
    return JSONResponse({"service": "node-runtime gateway", "version": __version__, **report,
                         "endpoints": list(state.endpoints)})


async def health(state: GatewayState, scope: dict, body: bytes) -> Response:
    status, report = await health_report(state)
    return JSONResponse(report, status_code=status)


async def _replica_metrics(session: aiohttp.ClientSession, replica: Replica) -> str | None:
    try:
        async with session.get(replica.url + "/metrics", timeout=CHECK_TIMEOUT, raise_for_status=True) as response:
            return await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        replica.failed("metrics")
        return None


async def metrics(state: GatewayState, scope: dict, body: bytes) -> Response:
    """Not an ASGI mount: each scrape also fetches every healthy replica's own metrics."""
    replicas = [replica for replica in state.pools.replicas.values() if replica.state == "healthy"]
    texts = await asyncio.gather(*(_replica_metrics(state.client, replica) for replica in replicas))
    by_replica = {(replica.model, replica.id): text for replica, text in zip(replicas, texts) if text is not None}
    return Response(gateway_metrics() + relabel_vllm_metrics(by_replica), media_type=CONTENT_TYPE_LATEST)
