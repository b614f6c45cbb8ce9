"""The gateway app: metrics outermost, then the POST routes (GenerationRoutes), then FastAPI for the GET
routes and the lifespan, which makes the upstream client (aiohttp, see upstream.py) and keeps the
replicas' pools current (route_files.py, health.py). All three are built from the one route table of
routes.py.

The two plain ASGI layers sit outside FastAPI, not inside as its middleware: a POST then skips
Starlette's own outermost layers (the app-in-scope and server-error wrappers of every send).
"""

import asyncio
import os
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from starlette.responses import Response

from node_runtime import __version__
from node_runtime.serving.gateway import api_docs, status
from node_runtime.serving.gateway.access_log import AccessLog
from node_runtime.serving.gateway.config import GatewayConfig
from node_runtime.serving.gateway.errors import install_error_handlers, quiet_stream_cuts
from node_runtime.serving.gateway.generation_routes import GenerationRoutes
from node_runtime.serving.gateway.health import CHECK_INTERVAL_S, ClusterMonitor, check_replicas, keep_checking
from node_runtime.serving.gateway.keys import Keys
from node_runtime.serving.gateway.metrics import MULTIPROCESS_DIR_ENV, RequestMetricsMiddleware, counted_worker
from node_runtime.serving.gateway.replicas import Pools
from node_runtime.serving.gateway.route_files import RouteFiles, follow
from node_runtime.serving.gateway.routes import ROUTES, Route
from node_runtime.serving.gateway.shared import Shared
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.scope import header, identified
from node_runtime.serving.gateway.upstream import upstream_session


def create_app(config: GatewayConfig, api_key: str | None = None, internal_key: str | None = None, *,
               api_keys: dict[str, str] | None = None, cluster_ttl_s: float = 10.0,
               check_interval_s: float = CHECK_INTERVAL_S) -> RequestMetricsMiddleware:
    """`api_key`: the single key clients may send, `api_keys`: the named keys (name -> secret) of the
    config's `api_keys`; `internal_key`: what the gateway sends the replicas."""
    state = GatewayState(
        config=config, keys=Keys(api_key or None, api_keys or {}, config.api_keys, os.environ.get(MULTIPROCESS_DIR_ENV)),
        pools=Pools(config.models, speed_aware=config.speed_aware_models), route_files=RouteFiles(config.routes_dir, config.models),
        cluster=ClusterMonitor(config.cluster, ttl_s=cluster_ttl_s), endpoints=tuple(route.path for route in ROUTES),
    )
    state.health = Shared(partial(status.health_report, state))
    state.replica_metrics = Shared(partial(status.replica_metrics, state))
    state.api_document = api_docs.document(ROUTES, config)
    state.api_page = api_docs.page(state.api_document)
    quiet_stream_cuts()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with counted_worker():
            async with upstream_session(config.request_timeout_s, internal_key or None) as session:
                state.client = session
                # Routed and checked before the first request: a (re)started gateway answers at once.
                await check_replicas(session, state.pools, state.pools.apply(state.route_files.changed()))
                added = asyncio.Event()
                background = [asyncio.ensure_future(follow(state.route_files, state.pools, added)),
                              asyncio.ensure_future(keep_checking(session, state.pools, added, check_interval_s))]
                try:
                    yield
                finally:
                    for task in background:
                        task.cancel()
                    await asyncio.gather(*background, return_exceptions=True)

    # FastAPI's own /docs, /redoc and /openapi.json are off: they would describe only the GET routes;
    # the table's /openapi.json and /docs (api_docs.py) describe every route.
    app = FastAPI(title="node-runtime gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    for route in ROUTES:
        if route.method == "GET":
            app.add_api_route(route.path, _endpoint(route, state), methods=["GET"])
    install_error_handlers(app)
    generation_routes = GenerationRoutes(app, state, [route for route in ROUTES if route.method == "POST"])
    return RequestMetricsMiddleware(generation_routes, measured={route.path for route in ROUTES if route.measured},
                                    access_log=AccessLog(config.access_log_percent) if config.access_log_percent else None)


def _endpoint(route: Route, state: GatewayState):
    """A FastAPI endpoint calling the table's handler as the fast path does: (state, scope, body)."""
    async def endpoint(request: Request) -> Response:
        if route.auth:
            state.keys.admit(header(request.scope, b"authorization"), request.scope)
        return identified(await route.handler(state, request.scope, b""), request.scope)

    return endpoint
