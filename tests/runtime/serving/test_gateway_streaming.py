"""Streams pass through the gateway as they come, a stream cut upstream is cut for the client too, and
a client that hangs up is hung up on upstream (so vLLM stops generating for nobody).

The upstream here is shaped by the test (vLLM cannot be told to pause mid-stream or die on cue):
it sends one SSE event, then holds the rest until the test has seen that event through the gateway.
"""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from node_runtime.serving.gateway.generation_routes import read_body

from tests.support.processes import (
    ThreadServer, eventually, free_ports, gateway_config, gateway_with_two_workers, gateway_workers, metric_families, metric_values, paused,
    write_route,
)

RELEASE = threading.Event()
HUNG_UP = threading.Event()
HOLD_S = 5.0
NEVER_PROBED = "127.0.0.1:1"  # a Ray address: no /health is asked of these gateways
KEY = "stream-key-0123456789"


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def pausing_upstream(scope, receive, send):
    """vLLM's streaming shape; model "held" waits for RELEASE after its first event, "broken" dies there,
    "silent" (streaming or not) answers nothing more and notes when its client, the gateway, hangs up,
    "lingering" sends its usage and last event but keeps its end of the connection open until then."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200 if scope["path"] == "/health" else 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = json.loads(await read_body(receive))
    model = payload["model"]
    if model == "silent" and not payload.get("stream"):
        await note_hang_up(receive)
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": sse('{"choices": [{"text": "first"}]}'), "more_body": True})
    if model == "silent":
        await note_hang_up(receive)
        return
    if model == "lingering":
        usage = '{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}'
        await send({"type": "http.response.body", "body": sse(usage) + sse("[DONE]"), "more_body": True})
        await note_hang_up(receive)
        return
    if model == "broken":
        raise RuntimeError("engine died mid-stream")  # uvicorn drops the connection without ending the body
    for _ in range(int(HOLD_S / 0.05)):
        if RELEASE.is_set():
            break
        await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": sse('{"choices": [{"text": "second"}]}') + sse("[DONE]")})


async def note_hang_up(receive):
    while (await receive())["type"] != "http.disconnect":  # the body is read: only a hang-up can come
        pass
    HUNG_UP.set()


@pytest.fixture(scope="module")
def shaped_upstream():
    upstream = ThreadServer(pausing_upstream, free_ports(1)[0], "/health")
    yield upstream.url
    upstream.stop()


@pytest.fixture(scope="module")
def stream_routes(shaped_upstream, tmp_path_factory):
    """Each model's one replica: the shaped upstream."""
    routes = tmp_path_factory.mktemp("routes")
    for name in ("held", "broken", "silent"):
        write_route(routes, name, f"{name}/0", shaped_upstream)
    return routes


@pytest.fixture(scope="module")
def stream_gateway(stream_routes):
    from node_runtime.serving.gateway.app import create_app
    from node_runtime.serving.gateway.config import GatewayConfig

    gateway_port = free_ports(1)[0]
    config = gateway_config(gateway_port, ["held", "broken", "silent"], stream_routes, NEVER_PROBED, request_timeout_s=30)
    gateway = ThreadServer(create_app(GatewayConfig.model_validate(config)), gateway_port, "/v1/models")
    yield gateway.url
    gateway.stop()


@pytest.fixture(scope="module")
def keyed_stream_gateway(shaped_upstream, tmp_path_factory):
    """With a key, so that the gateway counts each stream's tokens."""
    from node_runtime.serving.gateway.app import create_app
    from node_runtime.serving.gateway.config import GatewayConfig

    routes = tmp_path_factory.mktemp("keyed-routes")
    write_route(routes, "lingering", "lingering/0", shaped_upstream)
    gateway_port = free_ports(1)[0]
    config = gateway_config(gateway_port, ["lingering"], routes, NEVER_PROBED, request_timeout_s=30)
    gateway = ThreadServer(create_app(GatewayConfig.model_validate(config), api_key=KEY), gateway_port, "/v1/models")
    yield gateway.url
    gateway.stop()


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "held", "prompt": "x", "stream": True}),
    ("/v1/chat/completions", {"model": "held", "messages": [{"role": "user", "content": "x"}], "stream": True}),
    ("/generate", {"model": "held", "prompt": "x", "stream": True}),
])
def test_stream_chunks_arrive_before_the_upstream_finishes(stream_gateway, path, body):
    RELEASE.clear()
    with httpx.stream("POST", stream_gateway + path, json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.iter_raw()
        first = next(chunks)
        # Had the gateway buffered, this first read would have waited HOLD_S and held the whole stream.
        assert first == sse('{"choices": [{"text": "first"}]}') and not RELEASE.is_set()
        RELEASE.set()
        rest = b"".join(chunks)
        # The upstream's own date and server headers are not relayed next to the gateway's.
        assert len(response.headers.get_list("date")) == 1 and len(response.headers.get_list("server")) == 1
    assert rest == sse('{"choices": [{"text": "second"}]}') + sse("[DONE]")


def test_a_stream_cut_upstream_is_cut_for_the_client(stream_gateway):
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", stream_gateway + "/v1/completions",
                          json={"model": "broken", "prompt": "x", "stream": True}, timeout=30) as response:
            assert response.status_code == 200
            b"".join(response.iter_raw())
    errors = metric_families(stream_gateway)["gateway_upstream_errors"]
    assert any(sample.labels == {"model": "broken", "replica": "broken/0", "kind": "stream_broken"} and sample.value >= 1
               for sample in errors.samples)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "silent", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "silent", "messages": [{"role": "user", "content": "x"}]}),
    ("/generate", {"model": "silent", "prompt": "x"}),
    ("/batch_generate", {"model": "silent", "prompts": ["x", "y"]}),
])
def test_a_client_that_hangs_up_is_hung_up_on_upstream(stream_gateway, path, body):
    HUNG_UP.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stream_gateway + path, json=body, timeout=httpx.Timeout(30, read=0.5))
    # Well before the gateway's own 30 s request timeout would close the upstream connection anyway.
    assert HUNG_UP.wait(10), "the model server never saw the gateway hang up"
    requests = metric_families(stream_gateway)["gateway_requests"]
    assert any(sample.labels == {"endpoint": path, "model": "silent", "status": "499"} and sample.value >= 1
               for sample in requests.samples)


def test_a_client_that_leaves_a_stream_is_hung_up_on_upstream(stream_gateway):
    HUNG_UP.clear()
    with httpx.stream("POST", stream_gateway + "/v1/completions",
                      json={"model": "silent", "prompt": "x", "stream": True}, timeout=30) as response:
        assert next(response.iter_raw()) == sse('{"choices": [{"text": "first"}]}')
    assert HUNG_UP.wait(10), "the model server never saw the gateway hang up"


def test_a_stream_left_at_its_last_event_is_answered_and_charged_in_full(keyed_stream_gateway):
    """The openai client hangs up as soon as it reads [DONE], which may be before the replica closes its
    end (here it never does): the client had the whole answer, so it is a 200 and its tokens count."""
    HUNG_UP.clear()
    client = openai.OpenAI(base_url=keyed_stream_gateway + "/v1", api_key=KEY, max_retries=0)
    chunks = list(client.completions.create(model="lingering", prompt="x", max_tokens=3, stream=True))
    assert [chunk.choices[0].text for chunk in chunks] == ["first"]  # the usage the client did not ask for is kept back
    assert HUNG_UP.wait(10), "the model server never saw the gateway hang up"

    def lingering(families: dict, family: str, label: str) -> dict:
        return {sample.labels[label]: sample.value for sample in families[family].samples
                if sample.name.endswith("_total") and sample.labels["model"] == "lingering"}

    # Noted when the gateway's request ends, which may be after the client's.
    families = eventually(lambda: (found := metric_families(keyed_stream_gateway))
                          and lingering(found, "gateway_requests", "status") and found,
                          timeout=10, what="the stream counted in /metrics")
    assert lingering(families, "gateway_requests", "status") == {"200": 1.0}
    assert lingering(families, "gateway_key_tokens", "kind") == {"prompt": 1.0, "completion": 3.0}


def test_a_killed_worker_is_replaced_and_its_request_no_longer_in_flight(stream_routes, work_dir):
    """`workers: 2`, one killed mid-stream: uvicorn starts another, which drops the dead one's in-flight count."""
    with gateway_with_two_workers(["silent"], stream_routes, NEVER_PROBED, work_dir) as (url, process), \
            httpx.Client(timeout=30) as client:
        pid = process.proc.pid
        doomed, other = gateway_workers(pid)
        HUNG_UP.clear()
        request = client.build_request("POST", url + "/v1/completions", json={"model": "silent", "prompt": "x", "stream": True})
        with paused(other):
            response = client.send(request, stream=True)  # so `doomed` accepts it
        chunks = response.iter_raw()  # kept: an unreferenced iterator, once collected, closes the connection
        assert next(chunks) == sse('{"choices": [{"text": "first"}]}')  # the upstream holds the rest
        assert metric_values(url, "gateway_requests_in_flight", "/v1/completions") == [1]
        doomed.kill()
        with pytest.raises(httpx.HTTPError):  # the stream is cut, not ended
            b"".join(chunks)
        assert HUNG_UP.wait(10), "the killed worker's upstream request was left open"
        deadline = time.monotonic() + 60
        while doomed.pid in [worker.pid for worker in gateway_workers(pid)] or len(gateway_workers(pid)) < 2:
            assert time.monotonic() < deadline, "uvicorn did not replace the killed worker"
            time.sleep(0.2)
        while metric_values(url, "gateway_requests_in_flight", "/v1/completions") != [0]:
            assert time.monotonic() < deadline, "the killed worker's request still counts as in flight"
            time.sleep(0.2)
