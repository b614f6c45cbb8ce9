"""The gateway app: metrics outermost, then the POST routes (GenerationRoutes), then FastAPI for the GET
routes and the lifespan, which makes the upstream client (aiohttp, see upstream.py).

The two plain ASGI layers sit outside FastAPI, not inside as its middleware: a POST then skips
Starlette's own outermost layers (the app-in-scope and server-error wrappers of every send).
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI

from node_runtime import __version__
from node_runtime.serving.gateway import generate, openai_api, status
from node_runtime.serving.gateway.errors import install_error_handlers
from node_runtime.serving.gateway.generation_routes import GenerationRoutes
from node_runtime.serving.gateway.metrics import RequestMetricsMiddleware, counted_worker
from node_runtime.serving.gateway.upstream import ClusterMonitor, upstream_session
from node_runtime.serving.spec import GatewayConfig


def create_app(config: GatewayConfig, api_key: str | None = None, *, cluster_ttl_s: float = 10.0) -> RequestMetricsMiddleware:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with counted_worker():
            async with upstream_session(config.request_timeout_s) as session:
                app.state.client = session
                yield

    # No /docs, /redoc or /openapi.json: the API is OpenAI's plus docs/runtime-contract.md, and
    # every request would first be matched against those routes.
    app = FastAPI(title="node-runtime gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.api_key = api_key or None
    app.state.servers = {server.name: server for server in config.servers}
    app.state.cluster = ClusterMonitor(config.cluster, ttl_s=cluster_ttl_s)
    app.include_router(openai_api.router)
    app.include_router(status.router)
    install_error_handlers(app)
    generation_routes = GenerationRoutes(app, app.state, handlers={
        "/generate": generate.generate,
        "/batch_generate": generate.batch_generate,
        "/v1/completions": openai_api.forward,
        "/v1/chat/completions": openai_api.forward,
    })
    return RequestMetricsMiddleware(generation_routes)
