"""The registered resource graph against the one recorded in tests/unit/graphs/ (engine URNs, aliases,
inputs, dependencies): what an existing stack would see change on its next `pulumi up`.

A change to the graph made on purpose updates the recording (`python -m tests.support.graph
tests/unit/graphs`, reviewed in the diff) or, while the recording predates it, is listed in INTENDED
with its reason. (Issue 10's restructure was proven against the graph before it in commit 931126c.)
"""

import json
from pathlib import Path

import pytest

from tests.support.graph import STACKS, differences, stack_graph

GRAPHS = Path(__file__).parent / "graphs"

# Changes made on purpose since the recording, each with its reason (none: the recording is current).
INTENDED: dict[str, set[str]] = {stack: set() for stack in STACKS}


@pytest.mark.parametrize("stack", STACKS)
def test_the_graph_changes_only_as_intended(stack):
    before = json.loads((GRAPHS / f"graph-{stack}.json").read_text())
    assert set(differences(before, stack_graph(stack))) == INTENDED[stack]


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
