"""The guide's endpoints: /generate and /batch_generate, served through vLLM's /v1/completions.

Routed by the table of routes.py, through the POST fast path (generation_routes.py). Their fields
are typed strictly, as OpenAI's are: "2" is not a number and "true" not a boolean (422 naming the
field). The answer models document the answers (/openapi.json); the handlers build plain dicts.
"""

import asyncio
import json
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from node_runtime.serving.gateway.errors import LONE_SURROGATE, GatewayError, validation_message
from node_runtime.serving.gateway.rejections import rejection
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.scope import identified
from node_runtime.serving.gateway.upstream import pass_through, post_upstream, route

INT64 = 2**63


def _unicode_text(value: str) -> str:
    """pydantic checks a string for half a surrogate pair ("\\ud800") only where it has a length limit;
    vLLM's tokenizer fails on one (a 500 for a stop string)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(LONE_SURROGATE) from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]
# Stop strings must not be empty (vLLM refuses them).
StopText = Annotated[str, Field(min_length=1), AfterValidator(_unicode_text)]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="a served name; required only when several models are served")
    max_tokens: int = Field(16, ge=1, description="tokens to generate, at most the model's context length minus the prompt")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no limit")
    stop: StopText | list[StopText] | None = Field(None, description="stop before any of these strings")
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int = Field(1, ge=1, description="sequences per prompt, at most the gateway's max_n (stack key maxN); "
                                        "more than 1 needs sampling (temperature not 0)")

    def completion_body(self, model: str, prompt: str, *, stream: bool = False, usage: bool = False) -> dict:
        """vLLM's request; `usage`: a stream asks for its tokens (for the key: upstream.RelayedStream reads
        and drops that event)."""
        fields = self.model_dump(exclude={"model", "prompt", "prompts", "stream"}, exclude_none=True)
        body = {"model": model, "prompt": prompt, "stream": stream, **fields}
        if stream and usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def sent(self) -> frozenset[str]:
        return frozenset(self.model_fields_set)


class GenerateRequest(Sampling):
    prompt: Text = Field(min_length=1)
    stream: bool = Field(False, description="answer as vLLM's completion stream (server-sent events)")


class BatchGenerateRequest(Sampling):
    prompts: list[Text] = Field(min_length=1, description="sent at once, answered in this order; "
                                                          "at most the gateway's max_batch_size (maxBatchSize)")


class Usage(BaseModel):
    """vLLM's usage, as it counts it (it may say more)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Output(BaseModel):
    text: str
    finish_reason: str | None


class GenerationResult(BaseModel):
    text: str = Field(description="the first sequence's text")
    finish_reason: str | None = Field(description="length, stop, ...: vLLM's")
    outputs: list[Output] = Field(description="every sequence (n of them)")
    usage: Usage


class GenerateAnswer(GenerationResult):
    id: str
    model: str


class BatchGenerateAnswer(BaseModel):
    model: str
    results: list[GenerationResult] = Field(description="one per prompt, in the order of prompts")
    usage: Usage = Field(description="summed over the results")


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
        errors = invalid.errors()
    if errors[0]["type"] == "json_invalid":
        # pydantic's JSON parser refuses half a surrogate pair as bad JSON; Python's takes it, so that
        # the field holding it is named.
        try:
            model.model_validate(json.loads(body))
        except ValidationError as invalid:
            errors = invalid.errors()
        except ValueError:
            pass
    message, field = validation_message(errors)
    raise GatewayError(422, message, param=field, code="invalid_request" if field else "invalid_json")


def check_n(state: GatewayState, request: Sampling) -> None:
    if request.n > state.config.max_n:
        raise GatewayError(422, f"n: {request.n} sequences per prompt is more than this gateway's limit of "
                                f"{state.config.max_n} (stack key maxN)", param="n", code="too_many_sequences")


def refused(request: Sampling, prompt_field: str, where: str | None = None):
    """A replica's refusal of the guide's request, as a 422 naming the field (vLLM answers 400)."""
    def error(status: int, content: bytes) -> GatewayError:
        found = rejection(status, content, prompt_field=prompt_field, sent=request.sent(), where=where)
        found.status = 422 if status == 400 else status
        found.param = found.param or where  # in a batch, at least which prompt
        return found

    return error


async def complete(state: GatewayState, scope: dict, model: str, body: dict, request: Sampling,
                   where: str | None = None) -> dict:
    """One completion of the guide's `request`; `where`: which prompt of a batch."""
    status, content = await post_upstream(state, scope, model, "/v1/completions", json.dumps(body).encode(),
                                          request.max_tokens)
    if status != 200:
        raise refused(request, where or "prompt", where)(status, content)
    completion = json.loads(content)
    state.keys.charge(scope, completion["usage"]["prompt_tokens"], completion["usage"]["completion_tokens"])
    return completion


async def generate(state: GatewayState, scope: dict, body: bytes) -> Response:
    request = parse(GenerateRequest, body)
    check_n(state, request)
    model = route(state, scope, request.model)
    completion_body = request.completion_body(model, request.prompt, stream=request.stream, usage=state.keys.required)
    if request.stream:
        return await pass_through(state, scope, model, "/v1/completions", json.dumps(completion_body).encode(),
                                  stream=True, refused=refused(request, "prompt"), relay_usage=False,
                                  tokens=request.max_tokens)
    completion = await complete(state, scope, model, completion_body, request)
    return identified(JSONResponse({"id": completion["id"], "model": model, **generation_result(completion)}), scope)


async def all_or_none(coroutines: list) -> list:
    """Each result in order; at the first failure the others are cancelled (their calls to the replicas
    closed, so vLLM stops generating for an answer nobody will get) and that failure raised."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for a finished one
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


async def batch_generate(state: GatewayState, scope: dict, body: bytes) -> Response:
    request = parse(BatchGenerateRequest, body)
    config = state.config
    if len(request.prompts) > config.max_batch_size:
        raise GatewayError(413, f"prompts has {len(request.prompts)} items, more than max_batch_size {config.max_batch_size}: "
                                "split the batch", param="prompts", code="batch_too_large")
    check_n(state, request)
    work = len(request.prompts) * request.n * request.max_tokens
    if work > config.max_batch_tokens:
        raise GatewayError(422, f"prompts: {len(request.prompts)} prompts x n {request.n} x max_tokens {request.max_tokens} "
                                f"= {work} tokens, more than this gateway's limit of {config.max_batch_tokens} per batch "
                                "(stack key maxBatchTokens): split the batch or ask for fewer tokens",
                           param="prompts", code="batch_too_large")
    model = route(state, scope, request.model)
    # All at once: vLLM's scheduler batches concurrent requests (continuous batching), and each
    # prompt goes to the least busy replica when it is sent, so a batch spreads over the pool.
    completions = await all_or_none([
        complete(state, scope, model, request.completion_body(model, prompt), request, f"prompts[{i}]")
        for i, prompt in enumerate(request.prompts)
    ])
    results = [generation_result(completion) for completion in completions]
    usage = {key: sum(result["usage"][key] for result in results) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return identified(JSONResponse({"model": model, "results": results, "usage": usage}), scope)
