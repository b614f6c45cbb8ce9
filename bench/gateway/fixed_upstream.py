"""A model server that answers at once: vLLM's OpenAI API shape, no engine behind it.

Put behind the gateway it isolates the gateway's own cost from the engine competing for the same
CPU cores. It speaks what the gateway uses of vLLM: POST /v1/completions and /v1/chat/completions
(JSON, or SSE when "stream": true), GET /health and GET /metrics. Its answers are fixed except for
the echoed model and the request's `n`/`max_tokens`, so both paths (direct and through the gateway)
get identical work. With DELAY_MS it holds each completion that long first, without using CPU: the
gateway then waits for its upstream as it does for vLLM, but nothing competes for the cores.

Run: python bench/gateway/fixed_upstream.py PORT [DELAY_MS]   (a plain ASGI app on uvicorn with uvloop + httptools)
"""

import asyncio
import itertools
import json
import sys
import time

import uvicorn

from node_runtime.serving.gateway.generation_routes import read_body

METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0"} 0.0
"""
_ids = itertools.count()
DELAY_S = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0


def completion(body: dict, chat: bool) -> dict:
    n, tokens = int(body.get("n", 1)), int(body.get("max_tokens") or 1)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": " a"}, "finish_reason": "length"} for i in range(n)]
    else:
        choices = [{"index": i, "text": " a", "logprobs": None, "finish_reason": "length"} for i in range(n)]
    return {"id": f"cmpl-{next(_ids)}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", "fixed"), "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens * n, "total_tokens": 5 + tokens * n}}


def sse_events(answer: dict, chat: bool, usage: bool) -> list[bytes]:
    """vLLM's stream: the usage only in a last event without choices, when stream_options.include_usage asks."""
    events = []
    head = {key: value for key, value in answer.items() if key != "usage"}
    for choice in answer["choices"]:
        delta = {"index": choice["index"], "finish_reason": choice["finish_reason"]}
        delta.update({"delta": choice["message"]} if chat else {"text": choice["text"]})
        events.append(b"data: " + json.dumps({**head, "choices": [delta]}).encode() + b"\n\n")
    if usage:
        events.append(b"data: " + json.dumps({**head, "choices": [], "usage": answer["usage"]}).encode() + b"\n\n")
    return events + [b"data: [DONE]\n\n"]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path, status, content_type = scope["path"], 200, b"application/json"
    if scope["method"] == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
        body = json.loads(await read_body(receive))
        if DELAY_S:
            await asyncio.sleep(DELAY_S)
        chat = path.endswith("chat/completions")
        answer = completion(body, chat)
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            for event in sse_events(answer, chat, (body.get("stream_options") or {}).get("include_usage") is True):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        payload = json.dumps(answer).encode()
    elif path == "/health":
        payload = b""
    elif path == "/metrics":
        payload, content_type = METRICS, b"text/plain; version=0.0.4; charset=utf-8"
    else:
        status, payload = 404, b'{"error": {"message": "not found", "type": "NotFoundError", "param": null, "code": 404}}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
