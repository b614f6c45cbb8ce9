"""The guide's endpoints: /generate and /batch_generate, served through vLLM's /v1/completions.

Routed by the table of routes.py, through the POST fast path (generation_routes.py).
"""

import asyncio
import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from node_runtime.serving.gateway.errors import GatewayError, validation_message
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.upstream import pass_through, post_upstream, route


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="required only when several models are served")
    max_tokens: int = Field(16, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)

    def completion_body(self, model: str, prompt: str, *, stream: bool = False) -> dict:
        fields = self.model_dump(exclude={"model", "prompt", "prompts", "stream"}, exclude_none=True)
        return {"model": model, "prompt": prompt, "stream": stream, **fields}


class GenerateRequest(Sampling):
    prompt: str = Field(min_length=1)
    stream: bool = False


class BatchGenerateRequest(Sampling):
    prompts: list[str] = Field(min_length=1)


def generation_result(completion: dict) -> dict:
    """vLLM's completion → the guide's answer: the text, why it stopped, and token counts."""
    outputs = [{"text": c["text"], "finish_reason": c["finish_reason"]} for c in sorted(completion["choices"], key=lambda c: c["index"])]
    return {"text": outputs[0]["text"], "finish_reason": outputs[0]["finish_reason"], "outputs": outputs,
            "usage": completion["usage"]}


def parse(model: type[BaseModel], body: bytes):
    """The body as `model`, or a 422 naming each offending field the way the client wrote it."""
    try:
        return model.model_validate_json(body)
    except ValidationError as invalid:
        message, field = validation_message(invalid.errors())
        raise GatewayError(422, message, param=field, code="invalid_request") from None


async def complete(state: GatewayState, scope: dict, model: str, body: dict, *, where: str | None = None) -> dict:
    status, content = await post_upstream(state, scope, model, "/v1/completions", json.dumps(body).encode())
    if status == 200:
        return json.loads(content)
    try:
        error = json.loads(content)["error"]
        message, param = error["message"], error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = content[:500].decode(errors="replace"), None
    if where:
        message, param = f"{where}: {message}", where if param in (None, "prompt") else param
    # The server rejected a field the gateway passed on: to the client that is a bad field (422).
    status = 422 if status == 400 else status
    raise GatewayError(status, message, param=param, code="upstream_rejected")


async def generate(state: GatewayState, scope: dict, body: bytes) -> Response:
    request = parse(GenerateRequest, body)
    model = route(state, scope, request.model)
    completion_body = request.completion_body(model, request.prompt, stream=request.stream)
    if request.stream:
        return await pass_through(state, scope, model, "/v1/completions", json.dumps(completion_body).encode(), stream=True)
    completion = await complete(state, scope, model, completion_body)
    return JSONResponse({"id": completion["id"], "model": model, **generation_result(completion)})


async def batch_generate(state: GatewayState, scope: dict, body: bytes) -> Response:
    request = parse(BatchGenerateRequest, body)
    limit = state.config.max_batch_size
    if len(request.prompts) > limit:
        raise GatewayError(413, f"prompts has {len(request.prompts)} items, more than max_batch_size {limit}: "
                                "split the batch", param="prompts", code="batch_too_large")
    model = route(state, scope, request.model)
    # All at once: vLLM's scheduler batches concurrent requests (continuous batching), and each
    # prompt goes to the least busy replica when it is sent, so a batch spreads over the pool.
    completions = await asyncio.gather(*(
        complete(state, scope, model, request.completion_body(model, prompt), where=f"prompts[{i}]")
        for i, prompt in enumerate(request.prompts)
    ))
    results = [generation_result(completion) for completion in completions]
    usage = {key: sum(result["usage"][key] for result in results) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return JSONResponse({"model": model, "results": results, "usage": usage})
