"""Every endpoint of the gateway, in one table: app.py builds both the FastAPI routes (GET) and the
POST fast path (generation_routes.py) from it, and metrics.py measures the rows marked `measured`,
so a new endpoint is routed, authenticated, measured and listed on `/` in one line.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from starlette.responses import Response

from node_runtime.serving.gateway import generate, openai_api, status
from node_runtime.serving.gateway.state import GatewayState

# (gateway state, ASGI scope, request body: empty for a GET) -> the response to send
Handler = Callable[[GatewayState, dict, bytes], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    path: str
    method: Literal["GET", "POST"]  # POST routes take the fast path; GET routes are FastAPI's
    handler: Handler
    auth: bool  # needs the API key (when one is configured)
    measured: bool  # counted in /metrics' gateway_requests (the status endpoints are not)


ROUTES = (
    Route("/", "GET", status.index, auth=False, measured=True),
    Route("/generate", "POST", generate.generate, auth=True, measured=True),
    Route("/batch_generate", "POST", generate.batch_generate, auth=True, measured=True),
    Route("/health", "GET", status.health, auth=False, measured=False),
    Route("/metrics", "GET", status.metrics, auth=False, measured=False),
    Route("/v1/models", "GET", openai_api.models, auth=True, measured=True),
    Route("/v1/completions", "POST", openai_api.forward, auth=True, measured=True),
    Route("/v1/chat/completions", "POST", openai_api.forward, auth=True, measured=True),
)
