"""The gateway as a hostile client meets it: what a black-box run found (issue 15, item 5), each against
the real `node-runtime gateway` and, where the behaviour is vLLM's, the session's real vLLM.

Where vLLM cannot be told what to do (hang, refuse one prompt of a batch on cue, die mid-stream), the
replica is an upstream shaped here, speaking vLLM's shapes, behind the same real gateway process.
"""

import asyncio
import json
import socket
import time

import httpx
import pytest

from node_runtime.serving.gateway.generation_routes import read_body

from .conftest import INTERNAL_KEY, MODEL_NAME
from tests.support.processes import (
    ThreadServer, eventually, free_ports, gateway_config, metric_families, start_gateway, vllm_work, vllm_work_settled,
    wait_until_vllm_idle, write_route,
)
from .upstreams import serve_lifespan

pytestmark = pytest.mark.slow

KEY = "hardened-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_n": 4, "max_batch_tokens": 2000, "max_batch_size": 8, "max_body_bytes": 65536,
          "max_header_bytes": 8192, "body_read_timeout_s": 2}


@pytest.fixture(scope="module")
def hardened(model_server, ray_head, work_dir, tmp_path_factory):
    """The real gateway with small limits and an API key; its one model the session's vLLM."""
    routes = tmp_path_factory.mktemp("hardened-routes")
    write_route(routes, MODEL_NAME, f"{MODEL_NAME}/0", model_server.url)
    port = free_ports(1)[0]
    process = start_gateway(gateway_config(port, [MODEL_NAME], routes, ray_head, **LIMITS), work_dir,
                            api_key=KEY, internal_key=INTERNAL_KEY)
    yield f"http://127.0.0.1:{port}", process
    process.stop()


def _post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=120, **kwargs)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error


def _count(url: str, endpoint: str, status: str) -> float:
    return sum(s.value for s in metric_families(url)["gateway_requests"].samples
               if s.name.endswith("_total") and s.labels["endpoint"] == endpoint and s.labels["status"] == status)


def test_a_failed_batch_cancels_its_siblings_in_vllm(hardened, model_server):
    url, _ = hardened
    wait_until_vllm_idle(model_server.url)
    tokens_before, finished_before = vllm_work(model_server.url)
    # Greedy, these three run to max_tokens (checked once: this tiny model emits no EOS for them).
    prompts = ["Ray schedules", "vLLM serves", "The quick brown fox", "Hello " * 600]
    error = _error(_post(url, "/batch_generate", {"prompts": prompts, "max_tokens": 480, "temperature": 0}), 422)
    assert error["param"] == "prompts[3]" and error["message"].startswith("prompts[3]: ")
    readings = vllm_work_settled(model_server.url)
    tokens, finished = readings[-1]
    assert finished == finished_before, f"vLLM finished a cancelled prompt of the batch: {readings}"
    assert tokens - tokens_before < 3 * 480 / 2, f"vLLM went on generating for the cancelled prompts: {readings}"


def test_sequences_and_a_batchs_work_are_capped(hardened):
    url, _ = hardened
    for path, body in (("/generate", {"prompt": "x", "n": 5}), ("/batch_generate", {"prompts": ["x"], "n": 5}),
                       ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "n": 5})):
        error = _error(_post(url, path, body), 422)
        assert error["param"] == "n" and "maxN" in error["message"]
    work = _error(_post(url, "/batch_generate", {"prompts": ["x"] * 5, "n": 4, "max_tokens": 101}), 422)
    assert work["param"] == "prompts" and "2020 tokens" in work["message"] and "maxBatchTokens" in work["message"]
    assert _post(url, "/generate", {"prompt": "x", "n": 4, "max_tokens": 2, "temperature": 1}).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/generate", {"prompt": "x", "max_tokens": "2"}, "max_tokens"),
    ("/generate", {"prompt": "x", "stream": "true"}, "stream"),
    ("/generate", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/generate", {"prompt": 7}, "prompt"),
    ("/batch_generate", {"prompts": ["x"], "n": 1.0}, "n"),
    ("/batch_generate", {"prompts": "x"}, "prompts"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "stream": "true"}, "stream"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "n": "2"}, "n"),
])
def test_numbers_and_booleans_sent_as_strings_are_refused_naming_the_field(hardened, path, body, param):
    assert _error(_post(hardened[0], path, body), 422)["param"] == param


def test_a_streamed_generate_refused_by_vllm_is_our_422(hardened):
    url, _ = hardened
    body = {"prompt": "Hello " * 600, "max_tokens": 4}
    for stream in (False, True):
        error = _error(_post(url, "/generate", {**body, "stream": stream}), 422)
        assert error["param"] == "prompt" and "maximum context length" in error["message"]
        assert "parameter=" not in error["message"]  # vLLM's note on its own field names is dropped


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/completions", {"prompt": "x", "seed": 10**23}, 400, "seed", "seed: Input should be less than or equal to"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "n must be at least 1"),
    ("/v1/completions", {"prompt": [999999]}, 400, "prompt", "out of vocabulary"),
    ("/v1/completions", {"prompt": "Hello " * 600}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, "stop", "stop cannot contain an empty string"),
    ("/v1/chat/completions", {"messages": None}, 422, "messages", "messages: must be a non-empty list"),
    ("/v1/completions", {"prompt": "\ud800"}, 422, "prompt", "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc00"}]}, 422, "messages[0].content",
     "lone surrogate"),
    ("/generate", {"prompt": "x", "stop": ["\ud800"]}, 422, "stop", "lone surrogate"),
    ("/generate", {"prompt": "x", "n": 2, "temperature": 0}, 422, "n", "n must be 1 when using greedy sampling"),
    ("/batch_generate", {"prompts": ["x", "y"], "n": 2, "temperature": 0}, 422, "n", "]: n must be 1 when using greedy"),
])
def test_vllms_refusals_name_the_clients_field(hardened, path, body, status, param, words):
    """param is the field as the client wrote it (not input_tokens, body.seed, or null), the message says
    what is wrong with it (not "'NoneType' object is not iterable"), and no 5xx (a lone surrogate in stop
    is a 500 from vLLM)."""
    model = {"model": MODEL_NAME} if path.startswith("/v1/") else {}
    raw = json.dumps({**model, "max_tokens": 4, **body}).encode()  # ensure_ascii: surrogates as \\u escapes
    response = httpx.post(hardened[0] + path, content=raw, headers={**AUTH, "content-type": "application/json"}, timeout=60)
    error = _error(response, status)
    assert error["param"] == param and words in error["message"], error


def test_size_limits_and_a_body_that_never_ends(hardened):
    url, _ = hardened
    too_big = httpx.post(url + "/generate", content=b'{"prompt": "' + b"x" * 70000 + b'"}', headers=AUTH, timeout=30)
    assert _error(too_big, 413)["code"] == "body_too_large"
    assert _error(httpx.post(url + "/generate", json={"prompt": "x"}, headers={**AUTH, "X-Big": "y" * 9000}), 431)["code"] \
        == "header_too_large"
    host, port = url.removeprefix("http://").split(":")
    # A head that never ends is refused once past the limit, not kept growing in memory.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 20000)
        assert _answer(sock).startswith(b"HTTP/1.1 431 ")
    # Half a body: 408 once body_read_timeout_s (2 s) has passed, and no longer in flight.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n".encode() + b'{"prompt": "')
        time.sleep(0.2)
        sock.sendall(b"x" * 10)
        started = time.monotonic()
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and 1.5 < time.monotonic() - started < 20
        assert b"body_timeout" in answer and b"connection: close" in answer.lower()
    eventually(lambda: [s.value for s in metric_families(url)["gateway_requests_in_flight"].samples
                        if s.labels["endpoint"] == "/generate"] == [0], timeout=10, what="/generate no longer in flight")


def _answer(sock: socket.socket) -> bytes:
    """Everything the gateway sends before it closes the connection: its head and body may come in
    separate segments, and a close with our bytes unread may reach us as a reset after the answer."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_request_ids_and_what_an_error_echoes(hardened):
    url, _ = hardened
    answered = _post(url, "/generate", {"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "mine-1"})
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "mine-1"
    batch = _post(url, "/batch_generate", {"prompts": ["x"], "max_tokens": 1})
    assert batch.status_code == 200 and len(batch.headers["x-request-id"]) == 32
    refused = _post(url, "/generate", {"prompt": 7}, headers={"X-Request-Id": "mine-2"})
    assert refused.status_code == 422 and refused.headers["x-request-id"] == "mine-2"
    long_id = _post(url, "/generate", {"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "z" * 200})
    assert long_id.headers["x-request-id"] != "z" * 200 and len(long_id.headers["x-request-id"]) == 32
    assert httpx.get(url + "/health", headers={"X-Request-Id": "mine-3"}).headers["x-request-id"] == "mine-3"
    assert "x-request-id" in httpx.get(url + "/no/such/path").headers
    huge = _error(_post(url, "/generate", {"prompt": "x", "model": "m" * 60000}), 404)  # within max_body_bytes
    assert len(huge["message"]) < 300 and "60000 characters" in huge["message"]


def test_the_clusters_addresses_only_to_key_holders(hardened, model_server):
    url, _ = hardened
    for path in ("/", "/health"):
        open_view, holder_view = httpx.get(url + path).json(), httpx.get(url + path, headers=AUTH).json()
        assert "ray_address" not in open_view["cluster"] and holder_view["cluster"]["ray_address"]
        assert open_view["cluster"]["nodes_alive"] == 1  # the rest of the report is there for everyone
    assert model_server.url not in httpx.get(url + "/").text
    assert httpx.get(url + "/", headers=AUTH).json()["replicas"][f"{MODEL_NAME}/0"]["url"] == model_server.url
    assert "ray_address" not in httpx.get(url + "/health", headers={"Authorization": "Bearer wrong"}).json()["cluster"]


# A replica shaped here: a stream that dies after its first event, one that never ends, a batch with one
# refused prompt.

HUNG_UP: list[str] = []
METRICS_FETCHES: list[float] = []


async def shaped_replica(scope, receive, send):
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    if scope["method"] == "GET":
        if scope["path"] == "/metrics":
            METRICS_FETCHES.append(time.monotonic())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = json.loads(await read_body(receive))
    if payload["prompt"] == "refused":
        error = {"error": {"message": "This prompt is refused. (parameter=input_text, value=refused)",
                           "type": "BadRequestError", "param": "input_text", "code": 400}}
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(error).encode()})
        return
    if payload.get("stream") and payload["prompt"] == "endless":
        await _stream_until_hung_up(receive, send)
        HUNG_UP.append(payload["prompt"])
        return
    if payload.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n',
                    "more_body": True})
        await asyncio.sleep(0.2)
        raise RuntimeError("engine died mid-stream")  # uvicorn drops the connection without ending the body
    while (await receive())["type"] != "http.disconnect":  # a prompt that takes forever: note its hang-up
        pass
    HUNG_UP.append(payload["prompt"])


async def _stream_until_hung_up(receive, send) -> None:
    """vLLM's events with include_usage's `"usage": null` (the gateway's usage path reads each one), every
    20 ms until the client, the gateway, hangs up."""
    async def hang_up():
        while (await receive())["type"] != "http.disconnect":
            pass

    hung_up = asyncio.ensure_future(hang_up())
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    while not hung_up.done():
        await send({"type": "http.response.body", "more_body": True,
                    "body": b'data: {"choices": [{"index": 0, "text": "a"}], "usage": null}\n\n'})
        await asyncio.wait([hung_up], timeout=0.02)


@pytest.fixture(scope="module")
def shaped_gateway(work_dir, tmp_path_factory):
    replica = ThreadServer(shaped_replica, free_ports(1)[0], "/health")
    routes = tmp_path_factory.mktemp("shaped-routes")
    write_route(routes, "shaped", "shaped/0", replica.url)
    port = free_ports(1)[0]
    process = start_gateway(gateway_config(port, ["shaped"], routes, "127.0.0.1:1", request_timeout_s=60), work_dir,
                            api_key=None)
    yield f"http://127.0.0.1:{port}", process
    process.stop()
    replica.stop()


def test_a_failed_batch_hangs_up_on_its_siblings(shaped_gateway):
    url, _ = shaped_gateway
    HUNG_UP.clear()
    started = time.monotonic()
    prompts = ["slow-1", "slow-2", "refused", "slow-3"]
    error = _error(httpx.post(url + "/batch_generate", json={"prompts": prompts}, timeout=30), 422)
    assert error["param"] == "prompts[2]" and error["message"] == "prompts[2]: This prompt is refused."
    assert time.monotonic() - started < 10  # at once, not after the siblings' 60 s timeout
    eventually(lambda: sorted(HUNG_UP) == ["slow-1", "slow-2", "slow-3"], timeout=10, what="every sibling hung up on")


def test_a_client_hanging_up_mid_stream_is_counted_499(shaped_gateway):
    """On a stream that never ends by itself: on vLLM's (480 tokens in about a second) a client that the
    loaded machine let read its first chunk a second late found the stream over, rightly counted 200."""
    url, _ = shaped_gateway
    HUNG_UP.clear()
    before = _count(url, "/v1/completions", "499")
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "endless", "stream": True}, timeout=30) as response:
        assert response.status_code == 200 and next(response.iter_raw())
    eventually(lambda: _count(url, "/v1/completions", "499") == before + 1, timeout=30, what="the hang-up counted as 499")
    eventually(lambda: HUNG_UP == ["endless"], timeout=10, what="the replica hung up on")


def test_a_stream_cut_by_its_replica_is_a_502_in_one_log_line(shaped_gateway):
    url, process = shaped_gateway
    before = _count(url, "/v1/completions", "502")
    log_before = process.log_path.read_text()
    with pytest.raises(httpx.RemoteProtocolError):  # cut, never looking complete
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "stream": True}, timeout=30) as response:
            assert response.status_code == 200
            b"".join(response.iter_raw())
    eventually(lambda: _count(url, "/v1/completions", "502") == before + 1, timeout=10, what="the cut stream counted as 502")
    new_lines = eventually(lambda: process.log_path.read_text()[len(log_before):].strip().splitlines(), timeout=10,
                           what="the cut logged")
    assert len(new_lines) == 1 and "shaped/0" in new_lines[0] and "cut mid-answer" in new_lines[0], new_lines
    assert "Traceback" not in process.log_path.read_text()


def test_scraping_hard_fetches_each_replicas_metrics_once(shaped_gateway):
    """20 scrapes at once share one fetch of the replica's metrics (and one /health report)."""
    url, _ = shaped_gateway
    time.sleep(1.1)  # past an earlier scrape's shared result
    fetches_before = len(METRICS_FETCHES)

    async def scrape():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.get(url + "/metrics") for _ in range(20)),
                                        *(client.get(url + "/health") for _ in range(20)))

    answers = asyncio.run(scrape())
    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.text for answer in answers[20:]}) == 1
    assert len(METRICS_FETCHES) - fetches_before == 1
