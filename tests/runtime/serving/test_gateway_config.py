"""The gateway's side of docs/runtime-contract.md: its examples parse, bad input names the field."""

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from node_runtime.serving.gateway.config import GatewayConfig, RouteFile
from node_runtime.serving.spec import describe_validation_error

CONTRACT = Path(__file__).resolve().parents[3] / "docs" / "runtime-contract.md"


def _gateway_examples() -> list[str]:
    """The JSON blocks of the contract's gateway section: the config, then a route file."""
    section = CONTRACT.read_text().split("### `node-runtime gateway`")[1].split("\n### ")[0]
    return re.findall(r"```json\n(.*?)```", section, re.S)


def test_the_contracts_examples_parse():
    config_text, route_text = _gateway_examples()
    config = GatewayConfig.model_validate_json(config_text)
    assert config.models == ["Llama-3.1-70B-Instruct", "Qwen2.5-7B-Instruct"] and config.workers == 1
    assert config.routes_dir == "/data/vllm-dcu/gateway/routes" and config.request_timeout_s == 600
    route = RouteFile.model_validate_json(route_text)
    assert route.model in config.models and route.base_url == "http://10.0.0.12:8100" and route.node == "dcu-worker-1"


def _error_for(data: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        GatewayConfig.model_validate(data)
    return describe_validation_error(caught.value, "CONFIG")


@pytest.mark.parametrize("change, named", [
    ({"models": ["a", "b", "a"]}, "CONFIG: models: Value error, each name must be unique, repeated: a"),
    ({"models": []}, "CONFIG: models: List should have at least 1 item"),
    ({"models": ["a", ""]}, "CONFIG: models: Value error, a served name cannot be empty"),
    ({"routes_dir": "relative/routes"}, "CONFIG: routes_dir: String should match pattern"),
    ({"servers": []}, "CONFIG: servers: unknown field"),
    ({"request_timeout_s": 0}, "CONFIG: request_timeout_s: Input should be greater than 0"),
    ({"speed_aware_models": ["gpt-9"]}, "speed_aware_models: gpt-9 not among models"),
])
def test_bad_config_names_the_key(change, named):
    data = {**json.loads(_gateway_examples()[0]), **change}
    assert named in _error_for(data)
