"""/openapi.json and /docs: the API described from the route table (routes.py) and the models its
handlers validate with, so the description cannot drift from what is served.

Written once per gateway start for its config (the limits it enforces are in the schema: `n`'s
maximum, how many prompts a batch takes, the served names) and served as bytes: GET routes only,
the POST fast path never sees them. /docs is a plain page rendered here, without scripts: a site
without internet access reads it too (Swagger UI would load from a CDN).
"""

import html
import json

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.responses import HTMLResponse, JSONResponse, Response

from node_runtime import __version__
from node_runtime.serving.gateway.config import GatewayConfig


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, as the client wrote it")
    code: str | None


class ErrorAnswer(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class OpenAIRequest(BaseModel):
    """OpenAI's request, passed to vLLM as sent; the gateway reads only these fields."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a served name; required only when several models are served")
    stream: bool | None = Field(None, description="server-sent events, relayed as they come")
    n: int | None = Field(None, ge=1, description="at most the gateway's max_n (stack key maxN)")


class CompletionRequest(OpenAIRequest):
    prompt: str | list = Field(description="vLLM's /v1/completions")


class ChatRequest(OpenAIRequest):
    messages: list[dict] = Field(min_length=1, description="vLLM's /v1/chat/completions")


class OpenAIAnswer(BaseModel):
    """vLLM's answer as it sent it (a stream: text/event-stream)."""

    model_config = ConfigDict(extra="allow")


class ModelCard(BaseModel):
    id: str
    object: str
    owned_by: str


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


# One event of a stream (OpenAPI 3.1: the schema of text/event-stream describes each event).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk of vLLM's completion stream as JSON, or [DONE] at the end"}}}

# The errors each kind of route may answer, beside its own answer.
ERRORS = {
    "any": {"404": "no such path", "405": "wrong method", "431": "request head too large"},
    "auth": {"401": "missing or wrong API key", "429": "a key's rate limit (Retry-After says when to retry)"},
    "POST": {"408": "body not sent in time", "413": "body too large, or too many prompts",
             "422": "a bad field, named in `param`", "503": "no healthy replica", "504": "a replica did not answer in time"},
    "/v1": {"400": "vLLM refused a field, named in `param`"},
}


def _limits(schemas: dict, config: GatewayConfig) -> None:
    """The config's limits and served names into the request schemas."""
    for name in ("GenerateRequest", "BatchGenerateRequest", "CompletionRequest", "ChatRequest"):
        properties = schemas[name]["properties"]
        properties["n"]["maximum"] = config.max_n
        properties["model"]["anyOf"][0]["enum"] = list(config.models)
    schemas["BatchGenerateRequest"]["properties"]["prompts"]["maxItems"] = config.max_batch_size


def document(routes, config: GatewayConfig) -> dict:
    """The OpenAPI 3.1 document of `routes` (routes.ROUTES) as this config serves them."""
    models = {ErrorAnswer} | {m for r in routes for m in (r.body, r.answer) if isinstance(m, type)}
    by_model, top = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                       ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})
    _limits(schemas, config)

    def ref(model: type[BaseModel]) -> dict:
        return by_model[(model, "validation")]

    paths: dict = {}
    for route in routes:
        errors = {**ERRORS["any"], **(ERRORS["auth"] if route.auth else {}), **(ERRORS["POST"] if route.method == "POST" else {}),
                  **(ERRORS["/v1"] if route.path.startswith("/v1/") and route.method == "POST" else {})}
        answer = ({"application/json": {"schema": ref(route.answer)}} if isinstance(route.answer, type)
                  else {route.answer: {"schema": {"type": "string"}}})
        if route.path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            answer["text/event-stream"] = {"schema": SSE_EVENT}
        operation = {
            "summary": route.summary,
            "operationId": route.method.lower() + (route.path.strip("/").replace("/", "_").replace(".", "_") or "index"),
            "responses": {"200": {"description": "answered", "content": answer},
                          **{status: {"description": why, "content": {"application/json": {"schema": ref(ErrorAnswer)}}}
                             for status, why in sorted(errors.items())}},
        }
        if route.path == "/health":
            operation["responses"]["503"] = {"description": "a model has no healthy replica",
                                             "content": {"application/json": {"schema": ref(route.answer)}}}
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(route.body)}}}
        if route.auth:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "node-runtime gateway", "version": __version__,
                 "description": "The guide's endpoints and OpenAI's, routed by `model` to vLLM replicas. "
                                "Errors: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer", "description": "an API key; required when the gateway has any"}}},
    }


def _type(schema: dict, schemas: dict) -> str:
    """A field's type in a few words: `integer`, `string or null`, `list of string`, a model's name."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " or ".join(_type(option, schemas) for option in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), schemas)}"
    return schema.get("type", "any")


LIMITS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<",
          "minLength": "characters >=", "minItems": "items >=", "maxItems": "items <="}


def _constraints(schema: dict) -> str:
    found = [f"{word} {schema[key]}" for key, word in LIMITS.items() if key in schema]
    for option in schema.get("anyOf", []):
        found += [f"{word} {option[key]}" for key, word in LIMITS.items() if key in option]
        if "enum" in option:
            found.append("one of " + ", ".join(map(str, option["enum"])))
    if "default" in schema:
        found.append(f"default {json.dumps(schema['default'])}")
    return "; ".join(found)


def _fields(name: str, schemas: dict) -> str:
    schema = schemas[name]
    rows = "".join(
        f"<tr><td><code>{html.escape(field)}</code>{' (required)' if field in schema.get('required', []) else ''}</td>"
        f"<td>{html.escape(_type(spec, schemas))}</td><td>{html.escape(_constraints(spec))}</td>"
        f"<td>{html.escape(spec.get('description', ''))}</td></tr>"
        for field, spec in schema.get("properties", {}).items())
    more = "<p>Other fields are passed on as sent.</p>" if schema.get("additionalProperties", False) is not False else ""
    return f"<table><tr><th>field</th><th>type</th><th>limits</th><th>meaning</th></tr>{rows}</table>{more}"


def page(doc: dict) -> str:
    """The document as one HTML page: per endpoint its summary, key, request fields and answers."""
    schemas = doc["components"]["schemas"]
    parts = [f"<h1>{html.escape(doc['info']['title'])} {html.escape(doc['info']['version'])}</h1>",
             f"<p>{html.escape(doc['info']['description'])} Machine-readable: <a href=\"/openapi.json\">/openapi.json</a>.</p>"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            parts.append(f"<h2>{method.upper()} <code>{html.escape(path)}</code></h2><p>{html.escape(operation['summary'])}"
                         + (" Needs <code>Authorization: Bearer &lt;key&gt;</code> when the gateway has API keys."
                            if "security" in operation else "") + "</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(_fields(body["$ref"].rsplit("/", 1)[1], schemas))
            answers = [f"<li>{status}: {html.escape(answer['description'])} ({html.escape(', '.join(answer.get('content', {})))})</li>"
                       for status, answer in operation["responses"].items()]
            parts.append(f"<ul>{''.join(answers)}</ul>")
    parts.append("<h2>Schemas</h2>")
    for name in sorted(schemas):
        if schemas[name].get("properties"):
            parts.append(f"<h3>{html.escape(name)}</h3>{_fields(name, schemas)}")
    style = "body{font-family:sans-serif;max-width:72em;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(doc['info']['title'])}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"


async def openapi_json(state, scope: dict, body: bytes) -> Response:
    return JSONResponse(state.api_document)


async def docs_page(state, scope: dict, body: bytes) -> Response:
    return HTMLResponse(state.api_page)
