"""The generation endpoints (every POST route) as one plain ASGI layer in front of FastAPI (app.py).

They are the busy routes, and each needs only: the API key, the body, one handler. FastAPI's
routing, dependency solving, Request object and exception layers cost about 0.1 ms of CPU per
request there (bench/gateway/RESULTS.md), a fifth of the gateway's latency budget, so these
routes skip them; errors keep the one shape of errors.py. The GET routes stay FastAPI's.
"""

import asyncio
from collections.abc import Awaitable

from starlette.responses import Response

from node_runtime.serving.gateway.errors import GatewayError, unexpected_error_response
from node_runtime.serving.gateway.routes import Route
from node_runtime.serving.gateway.state import GatewayState
from node_runtime.serving.gateway.scope import header, identified

# Said with an answer sent before the whole body was read: the rest of it is not read, the connection goes.
CLOSE = {"Connection": "close"}


class ClientLeft(Exception):
    """The client hung up before its body was in: nobody to answer."""


async def read_body(receive, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The request's body: 413 past `max_bytes`, 408 when it is not all in within `timeout_s`.

    A body small enough to come with the request's head is one message: that path costs nothing
    more. A longer one is timed (a timer that cancels this task, not a wait_for per message)."""
    message = await receive()
    if not message.get("more_body"):
        body = message.get("body", b"")
        if max_bytes is not None and len(body) > max_bytes:
            raise _too_large(max_bytes)
        return body
    task, timed_out = asyncio.current_task(), False

    def time_out():
        nonlocal timed_out
        timed_out = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, time_out) if timeout_s else None
    chunks, size = [], 0
    try:
        while True:
            if message["type"] == "http.disconnect":
                raise ClientLeft()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if max_bytes is not None and size > max_bytes:
                raise _too_large(max_bytes)
            if not message.get("more_body"):
                return b"".join(chunks)
            message = await receive()
    except asyncio.CancelledError:
        if not timed_out:
            raise
        if hasattr(task, "uncancel"):  # see unless_client_leaves
            task.uncancel()
        raise GatewayError(408, f"the request body was not all sent within {timeout_s:g} s", code="body_timeout",
                           headers=CLOSE) from None
    finally:
        if timer is not None:
            timer.cancel()


def _too_large(max_bytes: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than the gateway's limit of {max_bytes} bytes",
                        code="body_too_large", headers=CLOSE)


async def unless_client_leaves(receive, work: Awaitable[Response]) -> Response | None:
    """`work`'s response, or None if the client hangs up first.

    Cancelling `work` then closes its upstream connections, which is how vLLM learns to stop
    generating for nobody (it aborts a request whose client is gone). A stream's own hang-up is
    watched by Starlette's StreamingResponse once the stream has started.
    """
    task = asyncio.current_task()
    client_left = False

    async def watch():
        nonlocal client_left
        while (await receive())["type"] != "http.disconnect":  # the body is read: only a hang-up can come
            pass
        client_left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not client_left:
            raise
        if hasattr(task, "uncancel"):  # 3.11+ counts cancellations; the vendor DCU images run Python 3.10
            task.uncancel()
        return None
    finally:
        watcher.cancel()


class GenerationRoutes:
    """ASGI middleware: the POST routes of the table, by path; any other request goes on to the app."""

    def __init__(self, app, state: GatewayState, routes: list[Route]):
        self.app = app
        self.state = state
        self.routes = {route.path: route for route in routes}

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await self._answer(route, scope, receive)
        except GatewayError as error:
            response = identified(error.response(), scope)
        except ClientLeft:
            return
        except Exception:  # noqa: BLE001 — a bug is a 500 for the client, its traceback goes to the log
            response = unexpected_error_response(scope["method"], scope["path"])
        if response is not None:
            await response(scope, receive, send)

    async def _answer(self, route: Route, scope, receive) -> Response | None:
        if scope["method"] != "POST":
            raise GatewayError(405, f"{scope['path']} takes POST", code="method_not_allowed", headers={"Allow": "POST"})
        if route.auth:
            self.state.keys.admit(header(scope, b"authorization"), scope)
        config = self.state.config
        body = await read_body(receive, config.max_body_bytes, config.body_read_timeout_s)
        return await unless_client_leaves(receive, route.handler(self.state, scope, body))
