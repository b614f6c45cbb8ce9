"""Talking to the replicas: the model a request asks for, the replica that answers it, pass-through.

A call that finds its replica unreachable, or dropped before the first byte of the answer, is sent
once more to another replica of the model (replicas.py picks it); a call whose answer has started
is never sent again.

The upstream client is aiohttp's, not httpx (which STYLE.md suggests); measured evidence overrides
the style guide here. Against a fixed-answer upstream on the same machine, swapping httpx's
AsyncClient for aiohttp's alone took this gateway's added p50 from 1.08 ms to 0.48 ms (the issue's
budget is 0.5 ms), and a bare FastAPI proxy shows the same gap (httpx 0.9-1.0 ms, aiohttp ~0.4 ms);
with the smaller savings elsewhere in this package, the gateway's CPU time per request over the
whole benchmark fell from 1.5 ms to 0.42 ms.
bench/gateway/RESULTS.md has the figures and the command.
"""

import asyncio
import json
import logging
from collections.abc import Callable

import aiohttp
from fastapi.responses import Response, StreamingResponse

from node_runtime.serving.gateway.errors import GatewayError, StreamCut
from node_runtime.serving.gateway.replicas import Pools, Replica
from node_runtime.serving.gateway.scope import header, request_id
from node_runtime.serving.gateway.state import GatewayState

log = logging.getLogger("node_runtime.gateway")

# Hop-by-hop headers belong to one connection; date and server are the gateway's own (uvicorn's).
NOT_RELAYED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "date", "server",
})
# What a replica that never answered may have failed with: its request is safe to send elsewhere.
NOT_ANSWERED = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError,
                aiohttp.ConnectionTimeoutError)
# Below the model server's own idle keep-alive (uvicorn's 5 s in vLLM), so the gateway never sends
# on a connection the server is about to close.
KEEPALIVE_S = 4.0


def upstream_session(request_timeout_s: float, internal_key: str | None) -> aiohttp.ClientSession:
    """One pooled HTTP/1.1 keep-alive session for every replica.

    No connection limit: /batch_generate sends up to max_batch_size requests at once, by design.
    `sock_read` bounds the wait for each next byte (a stream may run long, a stall may not); bodies
    are relayed exactly as sent, so nothing is decompressed and no compression is asked for. The
    internal key (replicas off the head run vLLM with --api-key) goes on every call; a client's
    own Authorization header is never passed on.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=request_timeout_s),
        auto_decompress=False, skip_auto_headers=("Accept-Encoding",),
        headers={"Authorization": f"Bearer {internal_key}"} if internal_key else None,
    )


# Longer names are cut in error messages: a client's 1 MB `model` is not echoed back.
SHOWN_NAME = 80
LAST_EVENT = b"data: [DONE]\n\n"  # how vLLM ends every OpenAI stream


def served_model(models: list[str] | tuple[str, ...], model: str | None) -> str:
    """The served name a request's `model` asks for, among `models` (those its key may use, as OpenAI
    answers a model the key has no access to: 404); it may be left out when there is one."""
    if model is None:
        if len(models) == 1:
            return models[0]
        raise GatewayError(422, f"model is required when several models are served: {', '.join(models)}",
                           param="model", code="model_required")
    if model not in models:
        shown = model if len(model) <= SHOWN_NAME else f"{model[:SHOWN_NAME]}... ({len(model)} characters)"
        raise GatewayError(404, f"model '{shown}' is not served here; served models: {', '.join(models)}",
                           param="model", code="model_not_found")
    return model


def route(state: GatewayState, scope: dict, model: str | None) -> str:
    """served_model among the models the request's key may use, noting it in the scope:
    RequestMetricsMiddleware labels the request by it."""
    request_state = scope.setdefault("state", {})
    key = request_state.get("key")
    name = served_model(state.config.models if key is None or key.models is None else key.models, model)
    request_state["model"] = name
    return name


def not_answered(pools: Pools, replica: Replica, error: Exception) -> GatewayError:
    """The replica was not reached, or hung up before answering: it leaves its pool until its health
    check passes again, and the call may go to another replica."""
    replica.failed("unreachable", answered=False)
    pools.set_problem(replica, f"not reachable ({type(error).__name__}) by a request")
    return GatewayError(503, f"replica {replica.id} of '{replica.model}' is not reachable ({type(error).__name__}): "
                             "see /health", code="model_unavailable")


def call_failed(replica: Replica, error: Exception, *, answer_started: bool) -> GatewayError:
    """Any other failed call: a slow replica is a 504, a broken one a 503. Neither is sent again (but a
    non-streaming answer cut off once: see _send_for_whole_answer)."""
    if isinstance(error, asyncio.TimeoutError):
        replica.failed("timeout", answered=answer_started)
        return GatewayError(504, f"replica {replica.id} of '{replica.model}' did not answer in time ({type(error).__name__}); "
                                 "retry, or raise request_timeout_s", code="model_timeout")
    replica.failed("protocol", answered=answer_started)
    return GatewayError(503, f"replica {replica.id} of '{replica.model}' failed mid-request ({type(error).__name__}); "
                             "see /health", code="model_unavailable")


# Plain try/except rather than a context manager around each call: this is every request's path.
FAILED = (asyncio.TimeoutError, aiohttp.ClientError)


async def _send(state: GatewayState, scope: dict, model: str, path: str, body: bytes,
                failed: Replica | None = None, tokens: int | None = None) -> tuple[Replica, aiohttp.ClientResponse, float]:
    """POST to the least busy healthy replica (not `failed`; `tokens`, the request's max_tokens, weighs
    the replicas' speeds: Pools.pick), once more to another if it never answered: the answer's head,
    its replica counted in flight until the caller calls end(started) with the third value."""
    headers = {"content-type": "application/json", "accept": header(scope, b"accept") or "*/*",
               "x-request-id": request_id(scope)}
    while True:
        replica = state.pools.pick(model, avoid=failed, tokens=tokens)
        scope["state"]["replica"] = replica.id  # for the access log
        started = replica.begin()
        try:
            response = await state.client.post(replica.url + path, data=body, headers=headers)
        except NOT_ANSWERED as down:
            replica.end(started)
            error = not_answered(state.pools, replica, down)
            if failed is not None:
                raise error from None
            failed = replica
            continue
        except FAILED as broken:
            replica.end(started)
            raise call_failed(replica, broken, answer_started=False) from None
        except BaseException:
            replica.end(started)
            raise
        replica.answered(response.status)
        if response.status >= 500:
            replica.failed("http_5xx")
        return replica, response, started


class AnswerCut(Exception):
    """A replica closed its connection before its answer's end (it died mid-answer) and left its pool."""


async def _whole_answer(replica: Replica, response: aiohttp.ClientResponse, started: float, *,
                        tokens: int | None = None, pools_left_when_cut: Pools | None = None) -> bytes:
    """The answer's body, its call ended however it goes; a 200 read in full teaches the replica's speed
    for `tokens` (see Replica.end). Cut short, it is a failed call, or with `pools_left_when_cut`
    AnswerCut: the replica leaves its pool and the caller may send the call again."""
    whole = False
    try:
        content = await response.read()
        whole = response.status == 200
        return content
    except aiohttp.ClientPayloadError as cut:
        if pools_left_when_cut is None:
            raise call_failed(replica, cut, answer_started=True) from None
        replica.failed("protocol")
        pools_left_when_cut.set_problem(replica, f"broke off an answer ({type(cut).__name__})")
        raise AnswerCut() from None
    except FAILED as broken:
        raise call_failed(replica, broken, answer_started=True) from None
    finally:
        response.release()
        replica.end(started, tokens if whole else None)


async def _send_for_whole_answer(state: GatewayState, scope: dict, model: str, path: str, body: bytes,
                                 tokens: int | None = None) -> tuple[aiohttp.ClientResponse, bytes]:
    """A non-streaming call and its whole answer, sent once more to another replica when the first
    breaks off its answer: nothing of the answer has reached the client yet."""
    replica, response, started = await _send(state, scope, model, path, body, tokens=tokens)
    try:
        return response, await _whole_answer(replica, response, started, tokens=tokens, pools_left_when_cut=state.pools)
    except AnswerCut:
        replica, response, started = await _send(state, scope, model, path, body, failed=replica, tokens=tokens)
        return response, await _whole_answer(replica, response, started, tokens=tokens)


async def post_upstream(state: GatewayState, scope: dict, model: str, path: str, body: bytes,
                        tokens: int | None = None) -> tuple[int, bytes]:
    """POST a JSON body to a replica of `model` (`tokens`: its max_tokens, if known): its status and whole body."""
    response, content = await _send_for_whole_answer(state, scope, model, path, body, tokens)
    return response.status, content


def usage_of(completion) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI answer or stream event (parsed JSON), if it says."""
    usage = completion.get("usage") if isinstance(completion, dict) else None
    if isinstance(usage, dict):
        prompt, generated = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(generated, int):
            return prompt, generated
    return None


class RelayedStream(StreamingResponse):
    """A replica's stream, chunk by chunk as it comes; its connection is freed (or dropped, if unread)
    and its replica's call ended however the stream ends: finished, cut, or its client gone.

    A failure mid-stream cannot become an error answer any more (the status line is sent): it is
    counted (status 502), logged in one line, and the client's connection is dropped, so a cut stream
    never looks complete. A client that hangs up mid-stream is counted as 499.

    With keys, the gateway asks every stream for its usage (stream_options.include_usage) and takes the
    tokens from the event that carries it; unless the client asked for it too (`relay_usage`), that
    event (the one with no choices) is not relayed, so the client gets the stream it asked for.

    The stream is whole once the replica sends its last event: it is charged and counted then, before
    that event goes, because a client that has it may hang up before the replica's end of the
    connection closes (the openai client does), and Starlette then cancels the relay.
    """

    def __init__(self, keys, replica: Replica, response: aiohttp.ClientResponse, headers: dict[str, str],
                 started: float, relay_usage: bool, tokens: int | None = None):
        self.keys, self.replica, self.upstream, self.started = keys, replica, response, started
        self.tokens = tokens if response.status == 200 else None  # a whole 200 stream teaches the replica's speed
        self.relay_usage = relay_usage
        self.usage: tuple[int, int] | None = None
        self.finished = False
        self.state: dict = {}
        self._held = b""  # a chunk naming usage that ended mid-event, until the event's end comes
        self._end = b""  # the stream's last bytes so far, to see LAST_EVENT split over chunks
        super().__init__(self._chunks(), status_code=response.status, headers=headers)

    async def _chunks(self):
        try:
            async for chunk in self.upstream.content.iter_any():
                if self._held or b'"usage"' in chunk:  # only the usage event has the key as such
                    chunk = self._with_usage_noted(chunk)
                self._end = self._end[-len(LAST_EVENT):] + chunk[-len(LAST_EVENT):]
                if self._end.endswith(LAST_EVENT):
                    self._finish()
                if chunk:
                    yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as broken:
            if self.finished:  # cut after its last event: the client lost nothing
                return
            self.replica.failed("stream_broken")
            self.state["status"] = 502
            log.warning("the stream from replica %s of '%s' was cut mid-answer (%s): the client's connection is dropped",
                        self.replica.id, self.replica.model, type(broken).__name__)
            raise StreamCut() from None
        if self._held:
            yield self._held
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            if self.usage is not None:
                self.keys.charge(self.scope, *self.usage)

    def _with_usage_noted(self, chunk: bytes) -> bytes:
        """What to relay of `chunk`: whole SSE events (a part of one held until its end comes), the
        usage noted, its event dropped unless relayed."""
        data = self._held + chunk
        if not data.endswith(b"\n\n"):
            self._held = data
            return b""
        self._held = b""
        kept = []
        for event in data.split(b"\n\n")[:-1]:
            if b'"usage"' in event and event.startswith(b"data: "):
                try:
                    payload = json.loads(event[6:])
                except ValueError:
                    payload = None
                self.usage = usage_of(payload) or self.usage
                if not self.relay_usage and isinstance(payload, dict) and payload.get("choices") == []:
                    continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    async def listen_for_disconnect(self, receive) -> None:
        await super().listen_for_disconnect(receive)
        if not self.finished:  # the client left, not the stream ended
            self.state["status"] = 499

    async def __call__(self, scope, receive, send):
        self.scope, self.state = scope, scope.setdefault("state", {})
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.upstream.release()
            self.replica.end(self.started, self.tokens if self.finished else None)


async def pass_through(state: GatewayState, scope: dict, model: str, path: str, body: bytes, *, stream: bool,
                       refused: Callable[[int, bytes], GatewayError] | None = None, relay_usage: bool = True,
                       tokens: int | None = None) -> Response:
    """Forward the client's bytes; a stream (SSE) goes back chunk by chunk as it comes.

    A non-streaming answer is relayed in one piece: same bytes, fewer writes than a stream. An answer
    other than 200 becomes `refused(status, its body)` when given. `relay_usage`: see RelayedStream.
    `tokens`: the request's max_tokens, if it says (Pools.pick weighs the replicas' speeds by it).
    """
    replica, response, started = await _send(state, scope, model, path, body, tokens=tokens)
    if response.status != 200 and refused is not None:
        raise refused(response.status, await _whole_answer(replica, response, started))
    headers = {name: value for name, value in response.headers.items() if name.lower() not in NOT_RELAYED}
    headers["x-request-id"] = request_id(scope)
    if stream:
        return RelayedStream(state.keys, replica, response, headers, started, relay_usage, tokens)
    content = await _whole_answer(replica, response, started, tokens=tokens)
    if response.status == 200 and state.keys.required:  # see Keys.charge
        try:
            usage = usage_of(json.loads(content))
        except ValueError:
            usage = None
        if usage is not None:
            state.keys.charge(scope, *usage)
    return Response(content, status_code=response.status, headers=headers)
