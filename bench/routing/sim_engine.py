"""Simulated vLLM engines: the OpenAI API of `vllm serve`, a fixed number of slots, a fixed time per token.

Each engine answers POST /v1/completions (JSON, or SSE with "stream": true, with the usage chunk
when `stream_options.include_usage` asks for it, as vLLM does), GET /v1/models, /health and
/metrics (vLLM's running and waiting gauges and its finished-requests counter). A request holds one
of the engine's `slots` for `max_tokens` × its time per token; requests beyond the slots wait in
FIFO order, as vLLM's scheduler queues what does not fit in its batch. Waiting is `asyncio.sleep`
to absolute deadlines, so a late wake-up does not stretch the next token and the engine uses almost
no CPU: the engine, not the machine's cores, is what limits throughput.

One process hosts every engine given on its command line: one uvicorn server listening on one
socket per engine, each request dispatched on the port it arrived at.

Run: python bench/routing/sim_engine.py --model NAME --engine PORT:SLOTS:MS_PER_TOKEN [--engine ...]
"""

import argparse
import asyncio
import itertools
import json
import socket
import time
from dataclasses import dataclass, field

import uvicorn

from node_runtime.serving.gateway.generation_routes import read_body

_ids = itertools.count()


@dataclass
class Engine:
    model: str
    slots: int
    token_s: float
    running: int = 0
    waiting: int = 0
    finished: int = 0
    free: asyncio.Semaphore = field(init=False)

    def __post_init__(self):
        self.free = asyncio.Semaphore(self.slots)


ENGINES: dict[int, Engine] = {}  # by listening port


def parse_engine(text: str) -> tuple[int, int, float]:
    """PORT:SLOTS:MS_PER_TOKEN -> (port, slots, seconds per token)."""
    try:
        port, slots, ms = text.split(":")
        parsed = int(port), int(slots), float(ms) / 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"--engine {text!r}: expected PORT:SLOTS:MS_PER_TOKEN, e.g. 8001:16:10")
    if parsed[1] < 1 or parsed[2] <= 0:
        raise argparse.ArgumentTypeError(f"--engine {text!r}: SLOTS must be >= 1 and MS_PER_TOKEN > 0")
    return parsed


async def respond(send, status: int, payload: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def error(status: int, kind: str, message: str, param: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))


async def complete(engine: Engine, body: dict, send) -> None:
    tokens = body.get("max_tokens")
    tokens = 16 if tokens is None else tokens  # vLLM's default for /v1/completions
    if not isinstance(tokens, int) or tokens < 1:
        return await respond(send, 400, error(400, "BadRequestError", "max_tokens must be an integer >= 1", "max_tokens"))
    stream = bool(body.get("stream"))
    base = {"id": f"cmpl-{next(_ids)}", "object": "text_completion", "created": int(time.time()), "model": engine.model}
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
    engine.waiting += 1
    async with engine.free:
        engine.waiting -= 1
        engine.running += 1
        try:
            started = asyncio.get_running_loop().time()
            if not stream:
                await sleep_until(started + tokens * engine.token_s)
                answer = {**base, "choices": [{"index": 0, "text": " a" * tokens, "logprobs": None,
                                               "finish_reason": "length", "stop_reason": None}], "usage": usage}
                return await respond(send, 200, json.dumps(answer).encode())
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            chunk = {**base, "choices": [{"index": 0, "text": " a", "logprobs": None, "finish_reason": None, "stop_reason": None}]}
            middle = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            chunk["choices"][0]["finish_reason"] = "length"
            last = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            for token in range(1, tokens + 1):
                await sleep_until(started + token * engine.token_s)
                await send({"type": "http.response.body", "body": middle if token < tokens else last, "more_body": True})
            if (body.get("stream_options") or {}).get("include_usage"):
                usage_chunk = {**base, "choices": [], "usage": usage}
                await send({"type": "http.response.body", "body": b"data: " + json.dumps(usage_chunk).encode() + b"\n\n",
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        finally:
            engine.running -= 1
            engine.finished += 1


def metrics(engine: Engine) -> bytes:
    labels = f'{{engine="0",model_name="{engine.model}"}}'
    return (f"# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{labels} {engine.running}.0\n"
            f"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{labels} {engine.waiting}.0\n"
            f"# HELP vllm:request_success_total Count of successfully processed requests.\n"
            f"# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{engine.model}"}} {engine.finished}.0\n'
            ).encode()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    engine = ENGINES[scope["server"][1]]
    path, method = scope["path"], scope["method"]
    if method == "POST" and path == "/v1/completions":
        try:
            body = json.loads(await read_body(receive))
        except json.JSONDecodeError as bad:
            return await respond(send, 400, error(400, "BadRequestError", f"the body is not JSON: {bad}", None))
        if body.get("model") != engine.model:
            return await respond(send, 404, error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist.", "model"))
        return await complete(engine, body, send)
    if method == "GET" and path == "/health":
        return await respond(send, 200, b"")
    if method == "GET" and path == "/v1/models":
        card = {"id": engine.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": engine.model, "parent": None, "max_model_len": 4096}
        return await respond(send, 200, json.dumps({"object": "list", "data": [card]}).encode())
    if method == "GET" and path == "/metrics":
        return await respond(send, 200, metrics(engine), b"text/plain; version=0.0.4; charset=utf-8")
    await respond(send, 404, error(404, "NotFoundError", f"{method} {path} is not served here", None))


def main() -> None:
    # Not bench.harness.parser: bench_routing runs this file by its path, where the bench package is not
    # importable, and an engine is a helper of a bench, with no report of its own.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the served model name (requests naming another get vLLM's 404)")
    parser.add_argument("--engine", type=parse_engine, action="append", required=True, metavar="PORT:SLOTS:MS_PER_TOKEN")
    args = parser.parse_args()
    sockets = []
    for port, slots, token_s in args.engine:
        ENGINES[port] = Engine(args.model, slots, token_s)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sockets.append(sock)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", access_log=False, log_level="warning",
                            backlog=4096, timeout_keep_alive=60)
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
