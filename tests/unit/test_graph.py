"""The registered resource graph against the one recorded in tests/unit/graphs/ (engine URNs, aliases,
inputs, dependencies): what an existing stack would see change on its next `pulumi up`.

A change to the graph made on purpose updates the recording (`python -m tests.support.graph
tests/unit/graphs`) or, while the recording predates it, is listed in INTENDED with its reason.
"""

import json
from pathlib import Path

import pytest

from tests.support.graph import STACKS, differences, stack_graph

GRAPHS = Path(__file__).parent / "graphs"

# Issue 10 (restructure): RayCluster now holds the Ray head, workers and readiness gate (aliases keep
# their URNs); the serve spec carries the concrete layout; the gateway's request timeout has its own key.
SERVER = {"dev": "vllm-server-Llama-3.1-70B-Instruct-container", "local": "vllm-server-SmolLM2-135M-Instruct-container"}
INTENDED = {
    stack: {
        f"new vllm-dcu:index:RayCluster: urn:pulumi:{stack}::vllm-dcu::vllm-dcu:index:Deployment$vllm-dcu:index:RayCluster::vllm-ray",
        f"input {SERVER[stack]}.envs",
        "input vllm-gateway-container.envs",
    }
    for stack in STACKS
}
# Inside those env values, the keys that changed (JSON paths), and nothing else.
SERVE_SPEC_CHANGES = {"tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "cluster.gpus_per_node"}
GATEWAY_CONFIG_CHANGES = {"request_timeout_s", "cluster.gpus_per_node"}


def _flat(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _env_json(node: dict, name: str) -> dict:
    (value,) = [e.split("=", 1)[1] for e in node["inputs"]["envs"] if e.startswith(name + "=")]
    return _flat(json.loads(value))


def _changed_keys(before: dict, after: dict) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


@pytest.mark.parametrize("stack", STACKS)
def test_the_graph_changes_only_as_intended(stack):
    before = json.loads((GRAPHS / f"graph-{stack}.json").read_text())
    after = stack_graph(stack)
    assert set(differences(before, after)) == INTENDED[stack]

    def node(graph, name):
        (found,) = [n for urn, n in graph.items() if urn.endswith("::" + name)]
        return found

    spec = [_env_json(node(g, SERVER[stack]), "NODE_RUNTIME_SERVE_SPEC") for g in (before, after)]
    assert _changed_keys(*spec) <= SERVE_SPEC_CHANGES
    gateway = [_env_json(node(g, "vllm-gateway-container"), "NODE_RUNTIME_GATEWAY_CONFIG") for g in (before, after)]
    assert _changed_keys(*gateway) <= GATEWAY_CONFIG_CHANGES
    # The other variables of those containers are unchanged.
    for name in (SERVER[stack], "vllm-gateway-container"):
        rest = [sorted(e for e in node(g, name)["inputs"]["envs"] if not e.startswith("NODE_RUNTIME_")) for g in (before, after)]
        assert rest[0] == rest[1]


def test_a_difference_is_found():
    """The comparison itself: a changed input, a lost dependency and a renamed resource are all reported."""
    before = stack_graph("local")
    after = json.loads(json.dumps(before))
    urn, node = next((u, n) for u, n in after.items() if u.endswith("::vllm-ray-head-container"))
    node["inputs"]["shmSize"] = 1
    node["dependencies"] = node["dependencies"][1:]
    gateway = next(u for u in after if u.endswith("::vllm-gateway-container"))
    after[gateway.replace("vllm-gateway-container", "vllm-gateway-box")] = after.pop(gateway)
    found = differences(before, after)
    assert "input vllm-ray-head-container.shmSize" in found and "dependencies vllm-ray-head-container" in found
    assert any(line.startswith("new docker:index/container:Container") for line in found)
    assert any(line.startswith("gone docker:index/container:Container") for line in found)
