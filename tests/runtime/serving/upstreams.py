"""Replicas the tests shape themselves, where vLLM cannot be told when to answer, fail or pause.

ShapedReplica speaks vLLM's shapes over HTTP (uvicorn in a thread); RawReplica speaks bare TCP,
for failures HTTP servers do not make on cue: a reset before the answer, an answer cut short, a
request never answered. Both answer GET /health, so the gateway's health checks pass.
"""

import asyncio
import json
import socket
import struct
import threading

from node_runtime.serving.gateway.generation_routes import read_body

from tests.support.processes import ThreadServer, free_ports


async def serve_lifespan(receive, send) -> None:
    """An ASGI app's lifespan, with nothing to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


FIRST_EVENT = sse('{"choices": [{"index": 0, "text": "first"}]}')
REST_OF_STREAM = sse('{"choices": [{"index": 0, "text": "second"}]}') + sse("[DONE]")


def completion(model: str) -> dict:
    return {"id": "cmpl-shaped", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": " shaped", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class ShapedReplica:
    """One replica: /health answers `health_status`, /metrics one vLLM gauge; a POST is answered at
    once, except a stream, which sends FIRST_EVENT and holds the rest until release(). It notes
    every request's Authorization header and how many POSTs it got."""

    def __init__(self, name: str):
        self.name = name
        self.health_status = 200
        self.posts = 0
        self.authorizations: list[str | None] = []
        self._released = threading.Event()
        self.server = ThreadServer(self, free_ports(1)[0], "/health")
        self.url = self.server.url
        self.authorizations.clear()  # ThreadServer's own readiness check

    def metrics(self) -> bytes:
        return (f"# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="{self.name}"}} {self.posts}.0\n').encode()

    def release(self) -> None:
        """Every stream held now, and every later one, runs to its end."""
        self._released.set()

    def hold(self) -> None:
        self._released.clear()

    def stop(self) -> None:
        self.release()
        self.server.stop()

    async def __call__(self, scope, receive, send):  # ASGI
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers = dict(scope["headers"])
        self.authorizations.append(headers[b"authorization"].decode() if b"authorization" in headers else None)
        if scope["method"] == "GET":
            status, body = {"/health": (self.health_status, b""), "/metrics": (200, self.metrics())}.get(scope["path"], (404, b""))
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        self.posts += 1
        payload = json.loads(await read_body(receive))
        if not payload.get("stream"):
            body = json.dumps(completion(payload["model"])).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": FIRST_EVENT, "more_body": True})
        while not self._released.is_set():
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": REST_OF_STREAM})


class RawReplica:
    """A TCP server that answers every GET (/health, /metrics) with an empty 200 and every POST as `post`:
    "reset" (the connection reset before a byte of the answer), "cut" (a status line and part of a
    body, then the connection closed) or "hang" (never a byte)."""

    HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    CUT = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"partial"

    def __init__(self, post: str):
        self.post = post
        self.posts = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(65536)
            if not chunk:
                connection.close()
                return
            head += chunk
        if head.startswith(b"GET "):
            connection.sendall(self.HEALTHY)
            connection.close()
            return
        self.posts += 1
        if self.post == "hang":
            self.held.append(connection)
            return
        if self.post == "cut":
            connection.sendall(self.CUT)
        else:  # SO_LINGER 0: close() sends a reset, not an orderly end
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    def close(self) -> None:
        self.sock.close()
        for connection in self.held:
            connection.close()

