"""The gateway in front of a real vLLM (CPU build) serving a tiny Llama, with a real Ray head."""

import json
import shlex
import subprocess

import httpx
import openai
import pytest

from .conftest import INTERNAL_KEY, MODEL_NAME
from tests.support.processes import (
    gateway_with_two_workers, gateway_workers, metric_families, metric_values, paused, vllm_work, vllm_work_settled,
    wait_until_vllm_idle,
)

pytestmark = pytest.mark.slow

GUIDE_CURL = """curl -X POST http://HOST:PORT/generate -H "Content-Type: application/json" -d '{"prompt": "Hello, I am a", "max_tokens": 50}'"""


def _post(gateway, path, body, **kwargs):
    return httpx.post(gateway.url + path, json=body, headers=gateway.auth, timeout=120, **kwargs)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error


def test_guide_curl_example_verbatim(gateway):
    command = GUIDE_CURL.replace("HOST:PORT", gateway.url.removeprefix("http://"))
    done = subprocess.run(shlex.split(command) + ["-s", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120)
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "200", body
    answer = json.loads(body)
    assert answer["model"] == MODEL_NAME
    assert isinstance(answer["text"], str) and answer["finish_reason"] in ("length", "stop")
    assert answer["usage"]["prompt_tokens"] > 0
    assert 0 < answer["usage"]["completion_tokens"] <= 50
    if answer["finish_reason"] == "length":
        assert answer["usage"]["completion_tokens"] == 50


def test_generate_with_sampling_fields(gateway):
    body = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
            "seed": 7, "n": 2, "stop": ["zzz"]}
    first, second = _post(gateway, "/generate", body), _post(gateway, "/generate", body)
    assert first.status_code == 200, first.text
    assert len(first.json()["outputs"]) == 2
    assert first.json()["outputs"] == second.json()["outputs"]  # same seed, same samples
    greedy = [_post(gateway, "/generate", {"prompt": "Hello", "max_tokens": 6, "temperature": 0}).json()["text"] for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_generate_stream(gateway):
    with httpx.stream("POST", gateway.url + "/generate", json={"prompt": "Hello", "max_tokens": 12, "stream": True},
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw_chunks = list(response.iter_raw())
    events = [line.removeprefix("data: ") for line in b"".join(raw_chunks).decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert len(events) >= 2 and all("choices" in json.loads(event) for event in events[:-1])


def test_batch_generate_in_input_order(gateway):
    prompts = ["Hello, I am a", "The quick brown fox", "Ray schedules", "vLLM serves", "lazy dog"]
    batch = _post(gateway, "/batch_generate", {"prompts": prompts, "max_tokens": 6, "temperature": 0})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    one_by_one = [_post(gateway, "/generate", {"prompt": p, "max_tokens": 6, "temperature": 0}).json()["text"] for p in prompts]
    assert [result["text"] for result in results] == one_by_one
    assert batch.json()["usage"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in results)


def test_batch_limits(gateway):
    error = _error(_post(gateway, "/batch_generate", {"prompts": ["x"] * 9}), 413)
    assert error["param"] == "prompts" and "max_batch_size 8" in error["message"]
    assert _error(_post(gateway, "/batch_generate", {"prompts": []}), 422)["param"] == "prompts"


def test_batch_names_the_prompt_vllm_rejected(gateway):
    long_prompt = "Hello " * 600  # past max_model_len 512
    error = _error(_post(gateway, "/batch_generate", {"prompts": ["fine", long_prompt], "max_tokens": 4}), 422)
    assert error["message"].startswith("prompts[1]:")


def test_bad_requests_name_the_field(gateway):
    bad_json = httpx.post(gateway.url + "/generate", content=b'{"prompt": "x"', headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(bad_json, 422)["message"]
    missing = _error(_post(gateway, "/generate", {"max_tokens": 5}), 422)
    assert missing["param"] == "prompt" and "prompt: Field required" in missing["message"]
    unknown = _error(_post(gateway, "/generate", {"prompt": "x", "max_token": 5}), 422)
    assert unknown["param"] == "max_token" and "unknown field" in unknown["message"]
    too_long = _error(_post(gateway, "/generate", {"prompt": "x", "max_tokens": 100000}), 422)
    assert too_long["param"] == "max_tokens"   # vLLM's own check, passed on as a bad field
    v1_bad_json = httpx.post(gateway.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    _error(v1_bad_json, 422)


def test_unknown_model_and_route(gateway):
    for path, body in (("/generate", {"prompt": "x", "model": "gpt-9"}),
                       ("/v1/completions", {"prompt": "x", "model": "gpt-9"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"})):
        error = _error(_post(gateway, path, body), 404)
        assert error["code"] == "model_not_found" and MODEL_NAME in error["message"]
    _error(httpx.get(gateway.url + "/no/such/endpoint"), 404)
    for path in ("/generate", "/v1/completions"):
        wrong_method = httpx.get(gateway.url + path)
        assert _error(wrong_method, 405)["code"] == "method_not_allowed" and wrong_method.headers["allow"] == "POST"


def test_v1_passes_vllm_answers_through(gateway):
    rejected = _post(gateway, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 100000})
    assert rejected.status_code == 400 and rejected.json()["error"]["param"] == "max_tokens"
    request_id = "req-test-123"
    answered = httpx.post(gateway.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2},
                          headers={"x-request-id": request_id})
    assert answered.status_code == 200 and answered.headers["x-request-id"] == request_id


def test_vllm_stops_generating_when_a_stream_client_hangs_up(gateway, model_server):
    """The gateway's part, hanging up upstream, is tested for every route in test_gateway_streaming.py.

    Here vLLM's part, for a stream. Not for a plain request: vLLM (CPU 0.32) does not reliably abort
    one whose client left, even when called directly; the closing note of issue 3 has the runs.

    What once made this fail (finished 21 == 20 on a fresh CI machine): an earlier test's request still
    finishing — so vLLM must be idle before the baseline. And (84 == 76, all 8 sequences of 480 tokens
    finished, in a CI run): vLLM finishing work before the hang-up reached it. On a loaded machine vLLM's
    API server, whose one event loop also handles every sequence's output, answered even its response
    headers 4 s late while its engine went on generating (six to eight busy loops on the two cores:
    8 sequences, about a second of work batched, finished every time; three times the sequences vLLM
    runs at once, two of three times). So the request asks for ten times the sequences vLLM runs at
    once, which it runs in ten waves (tens of seconds of work), and vLLM must stop before the last wave:
    the sequences it finished before the hang-up reached it may count, the rest may not.
    """
    wait_until_vllm_idle(model_server.url)
    tokens_before, finished_before = vllm_work(model_server.url)
    # EOS ignored, so vLLM would generate every one of these tokens for a client still there.
    sequences, max_tokens = 3 * model_server.spec["max_num_seqs"], 480
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
            "seed": 0, "n": sequences, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and next(response.iter_raw())  # one chunk, then the client leaves
    readings = vllm_work_settled(model_server.url)  # until a second without a new token
    tokens, finished = readings[-1]
    assert finished - finished_before < sequences, f"vLLM finished the request of a client that had left: {readings}"
    assert 0 < tokens - tokens_before < sequences * max_tokens


def test_openai_client(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused-without-a-gateway-key", max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    completion = client.completions.create(model=MODEL_NAME, prompt="Hello, I am a", max_tokens=5)
    assert completion.usage.completion_tokens <= 5 and completion.choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
    streamed = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=6, stream=True))
    assert len(streamed) >= 2


def test_status_and_health(gateway, model_server):
    assert _post(gateway, "/generate", {"prompt": "status", "max_tokens": 1}).status_code == 200
    status = httpx.get(gateway.url + "/", timeout=60).json()
    assert status["status"] == "ok" and status["models"] == {MODEL_NAME: "ok"}
    replica = status["replicas"][f"{MODEL_NAME}/0"]
    assert replica["state"] == "healthy" and replica["url"] == model_server.url and replica["in_flight"] == 0
    assert replica["requests"] >= 1 and replica["node"] == "node-0"
    assert status["cluster"]["nodes_alive"] == 1 and status["cluster"]["nodes_expected"] == 1
    assert "/batch_generate" in status["endpoints"] and status["version"]
    health = httpx.get(gateway.url + "/health", timeout=60)
    assert health.status_code == 200 and health.json()["unhealthy"] == [] and health.json()["degraded"] == []
    assert "url" not in health.json()["replicas"][f"{MODEL_NAME}/0"]


def test_replicas_get_the_internal_key_never_the_clients(routing_gateway, model_server):
    """The session's vLLM requires the internal key, as replicas off the head do: the client's key opens
    the gateway, and the gateway's own key the replica."""
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1}
    assert httpx.post(model_server.url + "/v1/completions", json=body, headers=routing_gateway.auth).status_code == 401
    assert _post(routing_gateway, "/v1/completions", body).status_code == 200
    direct = httpx.post(model_server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {INTERNAL_KEY}"})
    assert direct.status_code == 200


def test_metrics(gateway):
    assert _post(gateway, "/generate", {"prompt": "metrics", "max_tokens": 2}).status_code == 200
    families = metric_families(gateway.url)
    requests = families["gateway_requests"].samples
    assert any(s.labels == {"endpoint": "/generate", "model": MODEL_NAME, "status": "200"} and s.value >= 1
               for s in requests if s.name == "gateway_requests_total")
    assert "gateway_request_duration_seconds" in families and "gateway_requests_in_flight" in families
    assert not any(s.labels.get("endpoint") in ("/health", "/metrics") for s in requests)
    replica = {"model": MODEL_NAME, "replica": f"{MODEL_NAME}/0"}
    assert any(s.labels == {**replica, "status": "200"} and s.value >= 1
               for s in families["gateway_upstream_requests"].samples if s.name == "gateway_upstream_requests_total")
    for gauge, value in (("gateway_replica_in_flight", 0), ("gateway_replica_routed", 1), ("gateway_replica_healthy", 1)):
        assert [(s.labels, s.value) for s in families[gauge].samples] == [(replica, value)], gauge
    passed_through = [name for name in families if name.startswith("vllm:")]
    assert passed_through, "no vllm:* metrics passed through"
    assert all(s.labels["model"] == MODEL_NAME and s.labels["replica"] == f"{MODEL_NAME}/0"
               for name in passed_through for s in families[name].samples)


@pytest.fixture
def two_workers(routes_dir, ray_head, work_dir):
    with gateway_with_two_workers([MODEL_NAME], routes_dir, ray_head, work_dir, internal_key=INTERNAL_KEY) as gateway:
        yield gateway


def test_several_workers_answer_and_count_as_one_gateway(two_workers):
    """/metrics, answered by either worker, counts what both served."""
    url, process = two_workers
    served = 0
    for worker, requests in zip(gateway_workers(process.proc.pid), (3, 4)):
        with paused(worker):
            for _ in range(requests):
                answer = httpx.post(url + "/generate", json={"prompt": "workers", "max_tokens": 1}, timeout=60)
                assert answer.status_code == 200, answer.text
                served += 1
    assert metric_values(url, "gateway_requests", "/generate") == [served]
    assert metric_values(url, "gateway_requests_in_flight", "/generate") == [0]
    families = metric_families(url)
    assert [s.value for s in families["gateway_upstream_requests"].samples
            if s.name.endswith("_total") and s.labels["status"] == "200"] == [served]
    assert [s.value for s in families["gateway_replica_routed"].samples] == [2]  # both workers route to it


class TestRoutingGateway:
    """Several models, an API key, a down and a hanging server, a cluster short of a node."""

    def test_api_key_required_on_generation_only(self, routing_gateway):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": routing_gateway.api_key}):
            for path in ("/generate", "/batch_generate", "/v1/completions", "/v1/chat/completions"):
                response = httpx.post(routing_gateway.url + path, json={}, headers=headers)
                assert _error(response, 401)["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
            assert httpx.get(routing_gateway.url + "/v1/models", headers=headers).status_code == 401
        assert httpx.get(routing_gateway.url + "/health", timeout=60).status_code != 401
        assert httpx.get(routing_gateway.url + "/metrics", timeout=60).status_code == 200

    def test_openai_client_with_the_key(self, routing_gateway):
        client = openai.OpenAI(base_url=routing_gateway.url + "/v1", api_key=routing_gateway.api_key, max_retries=0)
        assert {model.id for model in client.models.list()} == {MODEL_NAME, "refusing", "hanging"}
        assert client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=routing_gateway.url + "/v1", api_key="wrong", max_retries=0).models.list()

    def test_model_required_when_several_are_served(self, routing_gateway):
        error = _error(_post(routing_gateway, "/generate", {"prompt": "x"}), 422)
        assert error["param"] == "model" and "refusing" in error["message"]
        assert _post(routing_gateway, "/generate", {"prompt": "x", "model": MODEL_NAME, "max_tokens": 2}).status_code == 200

    def test_server_down_is_503(self, routing_gateway):
        for path, body in (("/generate", {"prompt": "x", "model": "refusing"}),
                           ("/v1/completions", {"prompt": "x", "model": "refusing"})):
            assert "refusing" in _error(_post(routing_gateway, path, body), 503)["message"]

    def test_server_timeout_is_504(self, routing_gateway):
        for path, body in (("/generate", {"prompt": "x", "model": "hanging"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "hanging"})):
            assert _error(_post(routing_gateway, path, body), 504)["code"] == "model_timeout"

    def test_health_names_every_unhealthy_part(self, routing_gateway):
        health = httpx.get(routing_gateway.url + "/health", timeout=60)
        assert health.status_code == 503
        report = health.json()
        assert report["status"] == "unhealthy"
        assert report["models"] == {MODEL_NAME: "ok", "refusing": "unavailable: no healthy replica", "hanging": "ok"}
        assert report["replicas"]["refusing/0"]["problem"].startswith("not reachable")
        assert report["unhealthy"] == ["model refusing: no healthy replica"]
        assert "ray cluster: 1 of 2 nodes alive, 0 of 0 GPUs" in report["degraded"]
        assert report["cluster"]["nodes_alive"] == 1 and report["cluster"]["nodes_expected"] == 2
