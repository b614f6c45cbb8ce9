"""/, /health and /metrics: open to everyone, no API key. Their handlers run as FastAPI routes (routes.py).

/ and /health read what the background checks found (health.py): asking them sends nothing to the
replicas. They are this worker's view; /metrics sums every worker's. With API keys configured, the
addresses inside the cluster (Ray's GCS, the replicas' URLs) are shown to key holders only.

Scraped hard, they stay cheap: /health's report is made at most once a second, and the replicas'
own metrics fetched at most once a second, however many ask at once (shared.py); the gateway's own
metrics are read fresh on every scrape.
"""

import asyncio
from typing import Literal

import aiohttp
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from node_runtime import __version__
from node_runtime.serving.gateway.health import CHECK_TIMEOUT
from node_runtime.serving.gateway.keys import sees_internals
from node_runtime.serving.gateway.metrics import gateway_metrics, relabel_vllm_metrics
from node_runtime.serving.gateway.replicas import Replica
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.scope import header



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


def _for_caller(state: GatewayState, scope: dict, report: dict) -> dict:
    """The report without Ray's address unless the caller may see inside the cluster (keys.sees_internals)."""
    if sees_internals(state.keys, header(scope, b"authorization")):
        return report
    return {**report, "cluster": {k: v for k, v in report["cluster"].items() if k != "ray_address"}}


async def index(state: GatewayState, scope: dict, body: bytes) -> Response:
    _, report = await health_report(state)
    internals = sees_internals(state.keys, header(scope, b"authorization"))
    for replica in [*state.pools.replicas.values(), *state.pools.draining]:
        report["replicas"][replica.id].update(requests=replica.requests, errors=replica.errors,
                                              **({"url": replica.url} if internals else {}))
    return JSONResponse({"service": "node-runtime gateway", "version": __version__, **_for_caller(state, scope, report),
                         "endpoints": list(state.endpoints)})


async def health(state: GatewayState, scope: dict, body: bytes) -> Response:
    status, report = await state.health.get()
    return JSONResponse(_for_caller(state, scope, report), status_code=status)


async def _replica_metrics(session: aiohttp.ClientSession, replica: Replica) -> str | None:
    try:
        async with session.get(replica.url + "/metrics", timeout=CHECK_TIMEOUT, raise_for_status=True) as response:
            return await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        replica.failed("metrics")
        return None


async def replica_metrics(state: GatewayState) -> bytes:
    """Every healthy replica's own vllm:* metrics, labelled (state.replica_metrics shares it)."""
    replicas = [replica for replica in state.pools.replicas.values() if replica.state == "healthy"]
    texts = await asyncio.gather(*(_replica_metrics(state.client, replica) for replica in replicas))
    by_replica = {(replica.model, replica.id): text for replica, text in zip(replicas, texts) if text is not None}
    return relabel_vllm_metrics(by_replica)


async def metrics(state: GatewayState, scope: dict, body: bytes) -> Response:
    """Not an ASGI mount: a scrape also shows every healthy replica's own metrics."""
    return Response(gateway_metrics() + await state.replica_metrics.get(), media_type=CONTENT_TYPE_LATEST)


class ClusterView(BaseModel):
    ray_address: str | None = Field(None, description="Ray's GCS; with API keys, shown to key holders only")
    nodes_alive: int | None
    nodes_expected: int
    gpus: float | None
    gpus_expected: float
    problem: str | None


class ReplicaView(BaseModel):
    model: str
    node: str
    state: Literal["starting", "healthy", "unhealthy", "draining"]
    problem: str | None
    in_flight: int


class HealthReport(BaseModel):
    """/health's answer (and /'s, which adds to it)."""

    status: Literal["ok", "degraded", "unhealthy"]
    models: dict[str, str] = Field(description="each served name: ok, degraded: K of N replicas healthy, or unavailable: ...")
    replicas: dict[str, ReplicaView]
    cluster: ClusterView
    degraded: list[str]
    unhealthy: list[str]


class IndexReplicaView(ReplicaView):
    url: str | None = Field(None, description="with API keys, shown to key holders only")
    requests: int = Field(description="this worker's calls to it")
    errors: int


class IndexReport(HealthReport):
    service: str
    version: str
    replicas: dict[str, IndexReplicaView]
    endpoints: list[str]
