"""Named API keys: who may call, which models each may use, requests and tokens per minute, usage per key name.

The unit tests drive the buckets with a clock of their own; the live ones run `node-runtime gateway`
(one worker and two) in front of the session's real vLLM with the official `openai` client.
"""

import json
import time

import httpx
import openai
import pytest

from node_runtime.serving.gateway.config import GatewayConfig, KeyPolicy
from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.keys import ANONYMOUS, Keys, KeysError, parse_named_keys
from node_runtime.serving.gateway.limits import Limiter

from .conftest import INTERNAL_KEY, MODEL_NAME
from tests.support.processes import free_ports, gateway_config, gateway_workers, metric_families, paused, start_gateway

SECRETS = {"alice": "alice-secret-0123456789", "bob": "bob-secret-0123456789", "carol": "carol-secret-0123456789"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_refill_continuously_and_say_when_to_retry():
    clock = Clock()
    limiter = Limiter(1, None, clock)
    for _ in range(3):
        limiter.admit(0, "alice", 3, None)  # a full bucket: the minute's allowance at once
    with pytest.raises(GatewayError) as refused:
        limiter.admit(0, "alice", 3, None)
    error = refused.value
    assert error.status == 429 and error.code == "rate_limit_exceeded" and error.error_type == "requests"
    assert error.headers["Retry-After"] == "20"  # one request per 20 s at 3 per minute
    clock.now += 19.5
    with pytest.raises(GatewayError):
        limiter.admit(0, "alice", 3, None)
    clock.now += 0.5
    limiter.admit(0, "alice", 3, None)


def test_tokens_are_charged_after_the_answer_and_a_debt_waits_to_be_paid():
    clock = Clock()
    limiter = Limiter(2, None, clock)
    limiter.admit(1, "bob", None, 60)
    limiter.charge(1, 60, 50)
    limiter.admit(1, "bob", None, 60)  # 10 left: let in, though it may overshoot
    limiter.charge(1, 60, 40)  # 30 in debt, paid at 1 token per second
    with pytest.raises(GatewayError) as refused:
        limiter.admit(1, "bob", None, 60)
    assert refused.value.error_type == "tokens" and refused.value.headers["Retry-After"] == "30"
    limiter.admit(0, "other", None, 60)  # another key's slot is its own
    clock.now += 31
    limiter.admit(1, "bob", None, 60)


def test_workers_share_the_buckets_through_the_file(tmp_path):
    clock = Clock()
    one, other = Limiter(1, str(tmp_path), clock), Limiter(1, str(tmp_path), clock)  # two workers' views
    one.admit(0, "alice", 2, None)
    other.admit(0, "alice", 2, None)
    for limiter in (one, other):
        with pytest.raises(GatewayError):
            limiter.admit(0, "alice", 2, None)


def _keys(**overrides) -> Keys:
    policies = [KeyPolicy(name="alice", models=["m1"], requests_per_minute=5), KeyPolicy(name="bob", tokens_per_minute=100),
                KeyPolicy(name="carol")]
    return Keys(overrides.get("single"), {name: SECRETS[name] for name in ("alice", "bob", "carol")}, policies)


def test_a_key_is_known_by_its_secret_and_named_everywhere_else():
    keys = _keys(single="the-single-key-0123")
    assert keys.identify(f"Bearer {SECRETS['alice']}").name == "alice"
    assert keys.identify(f"bearer {SECRETS['bob']} ").name == "bob"
    assert keys.identify("Bearer the-single-key-0123").name == "default"
    for wrong in (None, "", SECRETS["alice"], f"Basic {SECRETS['alice']}", "Bearer alice", f"Bearer {SECRETS['alice']}x"):
        with pytest.raises(GatewayError) as refused:
            keys.identify(wrong)
        assert refused.value.status == 401 and SECRETS["alice"] not in refused.value.message
    assert Keys(None, {}, []).identify(None) is ANONYMOUS  # no key configured: open, counted as "none"


def test_keys_from_env_must_match_the_configs_names():
    with pytest.raises(KeysError, match="no secret for bob; not in api_keys: mallory"):
        Keys(None, {"alice": "a" * 20, "mallory": "m" * 20}, [KeyPolicy(name="alice"), KeyPolicy(name="bob")])
    with pytest.raises(KeysError, match="keys alice and bob have the same secret") as same:
        Keys(None, {"alice": "s" * 20, "bob": "s" * 20}, [KeyPolicy(name="alice"), KeyPolicy(name="bob")])
    assert "s" * 20 not in str(same.value)
    with pytest.raises(KeysError, match="not valid JSON"):
        parse_named_keys("{alice")
    with pytest.raises(KeysError, match="name -> non-empty secret"):
        parse_named_keys('{"alice": 7}')
    assert parse_named_keys("") == {}


@pytest.mark.parametrize("change, problem", [
    ({"api_keys": [{"name": "none"}]}, "'none' is reserved"),
    ({"api_keys": [{"name": "a b"}]}, "api_keys.0.name"),
    ({"api_keys": [{"name": "a"}, {"name": "a"}]}, "each name must be unique, repeated: a"),
    ({"api_keys": [{"name": "a", "models": ["gpt-9"]}]}, "api_keys[0].models: gpt-9 not among models"),
    ({"api_keys": [{"name": "a", "requests_per_minute": 0}]}, "greater than or equal to 1"),
])
def test_the_configs_key_policies_are_checked(change, problem):
    config = {"models": ["m1"], "routes_dir": "/r", "cluster": {"ray_address": "127.0.0.1:1", "expected_nodes": 1,
                                                                  "expected_gpus": 0, "timeout_s": 1}, **change}
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        GatewayConfig.model_validate(config)


# Live: the real gateway in front of the session's vLLM.

POLICIES = [
    {"name": "alice", "requests_per_minute": 3},
    {"name": "bob", "tokens_per_minute": 60},
    {"name": "carol", "models": ["elsewhere"]},
]


@pytest.fixture(scope="module")
def keyed_gateway(routes_dir, ray_head, work_dir):
    """Three named keys and the single key; `elsewhere` is a served name without a replica."""
    port = free_ports(1)[0]
    config = gateway_config(port, [MODEL_NAME, "elsewhere"], routes_dir, ray_head, api_keys=POLICIES)
    process = start_gateway(config, work_dir, api_key="single-key-0123456789", internal_key=INTERNAL_KEY,
                            api_keys=SECRETS)
    yield f"http://127.0.0.1:{port}", process
    process.stop()


def _client(url: str, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=SECRETS[name], max_retries=0)


def _key_samples(url: str, family: str) -> dict[tuple, float]:
    labels = ("key", "model", "status") if family == "gateway_key_requests" else ("key", "model", "kind")
    return {tuple(s.labels[label] for label in labels): s.value
            for s in metric_families(url)[family].samples if s.name.endswith("_total")}


@pytest.mark.slow
def test_each_key_its_models_limits_and_usage_by_name(keyed_gateway):
    url, process = keyed_gateway
    before = _key_samples(url, "gateway_key_requests")  # the readiness check's 401, without a key
    alice, bob, carol = (_client(url, name) for name in ("alice", "bob", "carol"))
    # alice: 3 requests per minute, then 429 with Retry-After in OpenAI's shape (the client's RateLimitError).
    answers = [alice.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2) for _ in range(3)]
    with pytest.raises(openai.RateLimitError) as limited:
        alice.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2)
    error = limited.value.body
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests" and "alice" in error["message"]
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 20

    # bob: 60 tokens per minute, charged after each answer; a debt refuses the next request.
    first = bob.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=50, extra_body={"ignore_eos": True})
    second = bob.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=50, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as in_debt:
        bob.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=1)
    assert in_debt.value.body["type"] == "tokens"
    assert int(in_debt.value.response.headers["retry-after"]) >= 10  # about 40 tokens of debt at one per second

    # carol may use `elsewhere` only: the model she may not use is not served as far as she can tell (OpenAI: 404).
    with pytest.raises(openai.NotFoundError) as not_hers:
        carol.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=1)
    assert not_hers.value.body["param"] == "model" and not_hers.value.body["message"].endswith("served models: elsewhere")
    assert [model.id for model in carol.models.list()] == ["elsewhere"]
    unknown = httpx.post(url + "/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
    single = httpx.post(url + "/generate", json={"prompt": "x", "model": MODEL_NAME, "max_tokens": 1},
                        headers={"Authorization": "Bearer single-key-0123456789"}, timeout=60)
    assert single.status_code == 200, single.text

    after = _key_samples(url, "gateway_key_requests")
    requests = {labels: value - before.get(labels, 0) for labels, value in after.items()}
    assert requests[("alice", MODEL_NAME, "200")] == 3 and requests[("alice", "none", "429")] == 1
    assert requests[("bob", MODEL_NAME, "200")] == 2 and requests[("bob", "none", "429")] == 1
    assert requests[("carol", "none", "404")] == 1 and requests[("none", "none", "401")] == 1
    assert requests[("default", MODEL_NAME, "200")] == 1
    tokens = _key_samples(url, "gateway_key_tokens")
    assert tokens[("alice", MODEL_NAME, "prompt")] == sum(answer.usage.prompt_tokens for answer in answers)
    assert tokens[("alice", MODEL_NAME, "completion")] == sum(answer.usage.completion_tokens for answer in answers)
    assert tokens[("bob", MODEL_NAME, "completion")] == first.usage.completion_tokens + second.usage.completion_tokens == 100
    assert tokens[("default", MODEL_NAME, "completion")] == single.json()["usage"]["completion_tokens"]

    exposed = httpx.get(url + "/metrics").text + process.log_path.read_text()
    assert not any(secret in exposed for secret in (*SECRETS.values(), "single-key-0123456789"))


@pytest.mark.slow
def test_streams_are_counted_and_charged_and_the_client_gets_the_stream_it_asked_for(keyed_gateway):
    url, _ = keyed_gateway
    before = _key_samples(url, "gateway_key_tokens").get(("carol", "elsewhere", "completion"), 0)
    client = openai.OpenAI(base_url=url + "/v1", api_key="single-key-0123456789", max_retries=0)
    plain = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=7, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert all(chunk.choices for chunk in plain)  # no usage event the client did not ask for
    asked = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 5
    with httpx.stream("POST", url + "/generate", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "stream": True},
                      headers={"Authorization": "Bearer single-key-0123456789"}, timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert events and all(json.loads(event[6:])["choices"] for event in events)
    tokens = _key_samples(url, "gateway_key_tokens")
    assert tokens[("default", MODEL_NAME, "completion")] >= 7 + 5 + 1  # the earlier test's one, then these
    assert tokens.get(("carol", "elsewhere", "completion"), 0) == before


@pytest.mark.slow
def test_a_keys_limit_holds_across_gateway_workers(routes_dir, ray_head, work_dir):
    """Two workers, each taking requests in turn (the other paused): the key's 4 per minute hold for both."""
    port = free_ports(1)[0]
    config = gateway_config(port, [MODEL_NAME], routes_dir, ray_head, workers=2,
                            api_keys=[{"name": "alice", "requests_per_minute": 4}])
    process = start_gateway(config, work_dir, api_key=None, internal_key=INTERNAL_KEY, api_keys={"alice": SECRETS["alice"]})
    headers = {"Authorization": f"Bearer {SECRETS['alice']}"}
    try:
        first, second = gateway_workers(process.proc.pid)
        statuses = []
        started = time.monotonic()
        for worker, count in ((second, 2), (first, 3)):  # pausing one worker sends the requests to the other
            with paused(worker):
                statuses += [httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=30).status_code
                             for _ in range(count)]
        assert time.monotonic() - started < 15, "too slow for the test: a request per 15 s refills"
        assert statuses == [200, 200, 200, 200, 429]
    finally:
        process.stop()
