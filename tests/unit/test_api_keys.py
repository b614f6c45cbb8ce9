"""Named API keys and the gateway's limits, program side: apiKeys is one Pulumi secret whose values reach
the gateway only as a secret environment variable; its names, models and limits are validated with the
stack and travel in the gateway's config."""

import json

import pytest

from components.config import ConfigError, parse_stack_config
from node_runtime.serving.gateway.config import GatewayConfig
from tests.support.pulumi_program import REPO, run_program, stack_config
from tests.unit.test_program import env_of

VALUES = ["alice-value-0123456789abcdef", "bob-value-0123456789abcdef"]
API_KEYS = [
    {"name": "alice", "key": VALUES[0], "models": ["Llama-3.1-70B-Instruct"], "requestsPerMinute": 60},
    {"name": "bob", "key": VALUES[1], "tokensPerMinute": 100000},
]


def _dev(**changes) -> dict:
    return {**stack_config(REPO / "Pulumi.dev.yaml"), **changes}


def test_the_stack_keeps_names_models_and_limits_never_the_values():
    config = parse_stack_config(_dev(apiKeys=API_KEYS))
    assert [(key.name, key.models, key.requests_per_minute, key.tokens_per_minute) for key in config.api_keys] == [
        ("alice", ["Llama-3.1-70B-Instruct"], 60, None), ("bob", None, None, 100000)]
    assert not any(value in repr(config) for value in VALUES)


@pytest.mark.parametrize("entries, problem", [
    ([{"name": "alice"}], "vllm-dcu:apiKeys[0].key: required"),
    ([{"name": "alice", "key": "short"}], "vllm-dcu:apiKeys[0].key: use at least 16 characters"),
    ([{"name": "alice", "key": "has a space in the middle"}], "vllm-dcu:apiKeys[0].key: use at least 16 characters and no spaces"),
    ([API_KEYS[0], {**API_KEYS[1], "key": VALUES[0]}], "vllm-dcu:apiKeys[1].key: the same value as apiKeys[0].key"),
    ([API_KEYS[0], {**API_KEYS[1], "name": "alice"}], "vllm-dcu:apiKeys: each key needs its own name; repeated: alice"),
    ([{**API_KEYS[0], "name": "none"}], "vllm-dcu:apiKeys[0].name: 'none' is the gateway's own name"),
    ([{**API_KEYS[0], "name": "default"}], "vllm-dcu:apiKeys[0].name: 'default' is the gateway's own name for apiKey"),
    ([{**API_KEYS[0], "models": ["gpt-9"]}], "vllm-dcu:apiKeys[0].models: gpt-9 not served here"),
    ([{**API_KEYS[0], "requestsPerMinute": 0}], "vllm-dcu:apiKeys[0].requestsPerMinute: Input should be greater than or equal to 1"),
    ([{**API_KEYS[0], "rpm": 5}], "vllm-dcu:apiKeys[0].rpm: unknown key"),
])
def test_bad_keys_are_named_without_their_values(entries, problem):
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(_dev(apiKeys=entries))
    assert problem in str(raised.value), raised.value
    assert not any(value in str(raised.value) for value in VALUES)


@pytest.mark.parametrize("key, value, problem", [
    ("maxN", 0, "vllm-dcu:maxN: Input should be greater than or equal to 1"),
    ("maxRequestBodyMb", 0, "vllm-dcu:maxRequestBodyMb: Input should be greater than or equal to 1"),
    ("accessLogPercent", 101, "vllm-dcu:accessLogPercent: Input should be less than or equal to 100"),
    ("timeouts", {"bodyRead": 0}, "vllm-dcu:timeouts.bodyRead: Input should be greater than or equal to 1"),
])
def test_bad_gateway_limits_are_named(key, value, problem):
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        parse_stack_config(_dev(**{key: value}))


@pytest.fixture(scope="module")
def keyed():
    run = run_program(_dev(maxN=4, maxBatchTokens=5000, maxRequestBodyMb=2, maxHeaderKb=16, accessLogPercent=10,
                           timeouts={"bodyRead": 7}),
                      stack="dev", secrets={"apiKeys": json.dumps(API_KEYS), "apiKey": "single-value-0123456789"})
    assert run.error is None, run.error
    return run


def test_values_reach_the_gateway_as_a_secret_env_only(keyed):
    gateway = keyed.named("vllm-gateway-container")
    env = env_of(gateway)
    assert json.loads(env["NODE_RUNTIME_API_KEYS"]) == {"alice": VALUES[0], "bob": VALUES[1]}
    assert "envs" in gateway.secret_paths
    config = json.loads(env["NODE_RUNTIME_GATEWAY_CONFIG"])
    assert config["api_keys"] == [
        {"name": "alice", "models": ["Llama-3.1-70B-Instruct"], "requests_per_minute": 60, "tokens_per_minute": None},
        {"name": "bob", "models": None, "requests_per_minute": None, "tokens_per_minute": 100000}]
    for resource in keyed.resources:
        plain = json.dumps({key: value for key, value in resource.inputs.items() if key != "envs"})
        assert not any(value in plain for value in VALUES), resource.name
    assert not any(value in json.dumps(keyed.outputs) for value in VALUES)


def test_the_limits_reach_the_gateways_config(keyed):
    config = GatewayConfig.model_validate_json(env_of(keyed.named("vllm-gateway-container"))["NODE_RUNTIME_GATEWAY_CONFIG"])
    assert (config.max_n, config.max_batch_tokens, config.max_body_bytes, config.max_header_bytes,
            config.body_read_timeout_s, config.access_log_percent) == (4, 5000, 2 * 2**20, 16 * 2**10, 7, 10)


def test_keys_in_plain_text_are_refused():
    run = run_program(_dev(apiKeys=API_KEYS), stack="dev")
    assert run.error is not None and "vllm-dcu:apiKeys: holds API key values in plain text" in str(run.error)
    assert "--secret" in str(run.error) and not any(value in str(run.error) for value in VALUES)
    assert run.resources == []


def test_a_named_key_with_the_single_keys_value_is_refused():
    run = run_program(_dev(), stack="dev", secrets={"apiKeys": json.dumps(API_KEYS), "apiKey": VALUES[1]})
    assert run.error is not None and "a key has the same value as apiKey" in str(run.error)
