"""The gateway app: one router per concern, the upstream client made in the lifespan."""

from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from node_runtime import __version__
from node_runtime.serving.gateway import generate, openai_api, status
from node_runtime.serving.gateway.errors import install_error_handlers
from node_runtime.serving.gateway.metrics import RequestMetricsMiddleware
from node_runtime.serving.gateway.upstream import ClusterMonitor
from node_runtime.serving.spec import GatewayConfig


def create_app(config: GatewayConfig, api_key: str | None = None, *, cluster_ttl_s: float = 10.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # No pool limit: /batch_generate sends up to max_batch_size requests at once, by design.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(32, config.max_batch_size))
        timeout = httpx.Timeout(config.request_timeout_s, connect=5.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            app.state.client = client
            yield

    app = FastAPI(title="node-runtime gateway", version=__version__, lifespan=lifespan)
    app.state.config = config
    app.state.api_key = api_key or None
    app.state.servers = {server.name: server for server in config.servers}
    app.state.cluster = ClusterMonitor(config.cluster, ttl_s=cluster_ttl_s)
    for module in (status, generate, openai_api):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    return app
