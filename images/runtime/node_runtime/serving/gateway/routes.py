"""Every endpoint of the gateway, in one table: app.py builds both the FastAPI routes (GET) and the
POST fast path (generation_routes.py) from it, metrics.py measures the rows marked `measured`, and
api_docs.py describes every row in /openapi.json and /docs, so a new endpoint is routed,
authenticated, measured, listed on `/` and documented in one line.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel
from starlette.responses import Response

from node_runtime.serving.gateway import api_docs, generate, openai_api, status
from node_runtime.serving.gateway.state import GatewayState

# (gateway state, ASGI scope, request body: empty for a GET) -> the response to send
Handler = Callable[[GatewayState, dict, bytes], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    path: str
    method: Literal["GET", "POST"]  # POST routes take the fast path; GET routes are FastAPI's
    handler: Handler
    auth: bool  # needs an API key (when one is configured)
    measured: bool  # counted in /metrics' gateway_requests (the status and documentation endpoints are not)
    summary: str  # what it does, for /openapi.json and /docs
    body: type[BaseModel] | None = None  # the request body it takes
    answer: type[BaseModel] | str | None = None  # its answer: a JSON model, or a media type


ROUTES = (
    Route("/", "GET", status.index, auth=False, measured=True, answer=status.IndexReport,
          summary="Status: version, every model and replica, the Ray cluster, the endpoints"),
    Route("/generate", "POST", generate.generate, auth=True, measured=True, body=generate.GenerateRequest,
          answer=generate.GenerateAnswer, summary="Generate text for one prompt (the guide's request)"),
    Route("/batch_generate", "POST", generate.batch_generate, auth=True, measured=True,
          body=generate.BatchGenerateRequest, answer=generate.BatchGenerateAnswer,
          summary="Generate text for several prompts at once, answered in their order"),
    Route("/health", "GET", status.health, auth=False, measured=False, answer=status.HealthReport,
          summary="200 while every model has a healthy replica, 503 when one has none"),
    Route("/metrics", "GET", status.metrics, auth=False, measured=False, answer="text/plain",
          summary="Prometheus metrics: the gateway's, summed over its workers, and every replica's vllm:*"),
    Route("/v1/models", "GET", openai_api.models, auth=True, measured=True, answer=api_docs.ModelList,
          summary="OpenAI: the served models (those the key may use)"),
    Route("/v1/completions", "POST", openai_api.forward, auth=True, measured=True, body=api_docs.CompletionRequest,
          answer=api_docs.OpenAIAnswer, summary="OpenAI: a completion, passed to a replica of `model` (vLLM)"),
    Route("/v1/chat/completions", "POST", openai_api.forward, auth=True, measured=True, body=api_docs.ChatRequest,
          answer=api_docs.OpenAIAnswer, summary="OpenAI: a chat completion, passed to a replica of `model` (vLLM)"),
    Route("/openapi.json", "GET", api_docs.openapi_json, auth=False, measured=False, answer="application/json",
          summary="This API as an OpenAPI 3.1 document"),
    Route("/docs", "GET", api_docs.docs_page, auth=False, measured=False, answer="text/html",
          summary="This API as a page to read"),
)
