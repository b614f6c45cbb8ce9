"""Placement: every replica a home node and devices no other replica uses; refusals that name the key."""

import itertools
import json

import pytest

from components.config import ConfigError, parse_stack_config
from components.plan import make_plan
from tests.support.pulumi_program import REPO, run_program, stack_config

DIGEST = "@sha256:" + "ab" * 32


def _stack(gpus: list[int], models: list[dict], accelerator: str = "dcu") -> dict:
    return {
        "accelerator": accelerator,
        "baseImage": "harbor.example/vllm:0.9.2" + DIGEST,
        "head": {"address": "10.0.0.1", "name": "n0", "gpus": gpus[0]},
        "workers": [{"address": f"10.0.0.{i + 1}", "name": f"n{i}", "gpus": g} for i, g in enumerate(gpus[1:], 1)],
        "models": [{"id": f"org/m{i}", **m} for i, m in enumerate(models)],
    }


def _placed(values: dict) -> dict[str, list[tuple]]:
    """{model: [(nodes, devices, tp, pp, executor, port)]}"""
    plan = make_plan(parse_stack_config(values))
    return {
        model.name: [(r.nodes, r.devices, model.layout.tensor_parallel_size, model.layout.pipeline_parallel_size,
                      r.executor, r.port) for r in model.replicas]
        for model in plan.models
    }


R = tuple(range(8))
# (id, node GPU counts, models, expected placement)
PLACEMENTS = [
    ("one-node-auto", [8], [{}], {"m0": [(("n0",), R, 8, 1, "mp", 8100)]}),
    ("guide-auto-all-devices", [8, 8, 8], [{}],
     {"m0": [(("n0", "n1", "n2"), R, 8, 3, "ray", 8100)]}),
    ("replica-per-node", [8, 8, 8], [{"replicas": 3}],
     {"m0": [(("n0",), R, 8, 1, "mp", 8100), (("n1",), R, 8, 1, "mp", 8100), (("n2",), R, 8, 1, "mp", 8100)]}),
    ("fill-with-replicas-0", [8, 8], [{"replicas": 0, "tensorParallelSize": 4}],
     {"m0": [(("n0",), (0, 1, 2, 3), 4, 1, "mp", 8100), (("n1",), (0, 1, 2, 3), 4, 1, "mp", 8100),
             (("n0",), (4, 5, 6, 7), 4, 1, "mp", 8200), (("n1",), (4, 5, 6, 7), 4, 1, "mp", 8200)]}),
    ("small-tp-several-models-one-node", [8], [{"tensorParallelSize": 4}, {"tensorParallelSize": 2},
                                                {"tensorParallelSize": 2}],
     {"m0": [(("n0",), (0, 1, 2, 3), 4, 1, "mp", 8100)], "m1": [(("n0",), (4, 5), 2, 1, "mp", 8101)],
      "m2": [(("n0",), (6, 7), 2, 1, "mp", 8102)]}),
    ("tp1-replicas", [2, 2], [{"replicas": 3, "tensorParallelSize": 1}],
     {"m0": [(("n0",), (0,), 1, 1, None, 8100), (("n1",), (0,), 1, 1, None, 8100), (("n0",), (1,), 1, 1, None, 8200)]}),
    ("spanning-plus-fill", [8, 8, 8], [{"tensorParallelSize": 8, "pipelineParallelSize": 2},
                                        {"replicas": 0, "tensorParallelSize": 2}],
     {"m0": [(("n0", "n1"), R, 8, 2, "ray", 8100)],
      "m1": [(("n2",), (0, 1), 2, 1, "mp", 8101), (("n2",), (2, 3), 2, 1, "mp", 8201),
             (("n2",), (4, 5), 2, 1, "mp", 8301), (("n2",), (6, 7), 2, 1, "mp", 8401)]}),
    # Replica 0 of every model before replica 1 of any: growing one model moves no other.
    ("four-nodes-two-models", [4, 4, 4, 4], [{"replicas": 2, "tensorParallelSize": 4}, {"replicas": 2}],
     {"m0": [(("n0",), (0, 1, 2, 3), 4, 1, "mp", 8100), (("n2",), (0, 1, 2, 3), 4, 1, "mp", 8100)],
      "m1": [(("n1",), (0, 1, 2, 3), 4, 1, "mp", 8101), (("n3",), (0, 1, 2, 3), 4, 1, "mp", 8101)]}),
    ("mixed-node-sizes", [8, 4], [{"tensorParallelSize": 4, "replicas": 3}],
     {"m0": [(("n0",), (0, 1, 2, 3), 4, 1, "mp", 8100), (("n1",), (0, 1, 2, 3), 4, 1, "mp", 8100),
             (("n0",), (4, 5, 6, 7), 4, 1, "mp", 8200)]}),
    ("single-device-node", [1], [{}], {"m0": [(("n0",), (0,), 1, 1, None, 8100)]}),
    ("cpu-one-per-node", [0, 0, 0], [{"replicas": 3}],
     {"m0": [(("n0",), (), 1, 1, None, 8100), (("n1",), (), 1, 1, None, 8100), (("n2",), (), 1, 1, None, 8100)]}),
    ("cpu-replicas-0", [0, 0], [{"replicas": 0}, {}],
     {"m0": [(("n0",), (), 1, 1, None, 8100), (("n1",), (), 1, 1, None, 8100)], "m1": [(("n0",), (), 1, 1, None, 8101)]}),
    ("cpu-more-replicas-than-nodes", [0, 0], [{"replicas": 3}],
     {"m0": [(("n0",), (), 1, 1, None, 8100), (("n1",), (), 1, 1, None, 8100), (("n0",), (), 1, 1, None, 8200)]}),
    ("pp-within-one-node", [8, 8], [{"tensorParallelSize": 2, "pipelineParallelSize": 2, "replicas": 2}],
     {"m0": [(("n0",), (0, 1, 2, 3), 2, 2, "mp", 8100), (("n1",), (0, 1, 2, 3), 2, 2, "mp", 8100)]}),
]


@pytest.mark.parametrize("case,gpus,models,expected", PLACEMENTS, ids=[c[0] for c in PLACEMENTS])
def test_placement(case, gpus, models, expected):
    accelerator = "cpu" if not any(gpus) else "dcu"
    assert _placed(_stack(gpus, models, accelerator)) == expected


def test_the_table_covers_the_issue():
    assert len(PLACEMENTS) >= 12
    sizes = {len(gpus) for _, gpus, _, _ in PLACEMENTS}
    assert {1, 2, 3, 4} <= sizes and any(m.get("replicas") == 0 for _, _, ms, _ in PLACEMENTS for m in ms)


@pytest.mark.parametrize("case,gpus,models,expected", PLACEMENTS, ids=[c[0] for c in PLACEMENTS])
def test_no_device_serves_two_replicas(case, gpus, models, expected):
    plan = make_plan(parse_stack_config(_stack(gpus, models, "cpu" if not any(gpus) else "dcu")))
    used = [(node, device) for model in plan.models for replica in model.replicas
            for node in replica.nodes for device in replica.devices]
    assert len(used) == len(set(used))
    # Each replica sees exactly its TP x PP devices on each node it spans.
    for model in plan.models:
        for replica in model.replicas:
            assert not replica.devices or len(replica.devices) * len(replica.nodes) == model.layout.world_size
    # Ports are unique per node.
    listening = [(replica.home.label, replica.port) for model in plan.models for replica in model.replicas]
    assert len(listening) == len(set(listening))


def test_ray_owns_only_what_spanning_replicas_use():
    plan = make_plan(parse_stack_config(_stack([8, 8, 8], [{"tensorParallelSize": 8, "pipelineParallelSize": 2},
                                                           {"replicas": 0, "tensorParallelSize": 2}])))
    assert [node.ray_devices for node in plan.nodes] == [R, R, ()]
    assert plan.cluster.expected_gpus == 16


# (id, node GPU counts, models, key named, a word of the fix)
REFUSALS = [
    ("too-many-replicas", [8, 8], [{"replicas": 3}], "models[0].replicas", "lower replicas"),
    ("replicas-after-another-model", [8], [{"tensorParallelSize": 4}, {"tensorParallelSize": 4, "replicas": 2}],
     "models[1].replicas", "replica 2 of 2"),
    ("uneven-split", [8, 8], [{"tensorParallelSize": 3}], "models[0].tensorParallelSize", "splits every node unevenly"),
    ("spanning-leaves-no-devices", [8, 8], [{"tensorParallelSize": 4}, {"tensorParallelSize": 8, "pipelineParallelSize": 2}],
     "models[0].replicas", "does not fit in the devices left (0, 0 free per node)"),
    ("fill-finds-nothing", [8], [{}, {"replicas": 0, "tensorParallelSize": 1}], "models[1].replicas", "found no 1 free"),
    ("spanning-uneven-nodes", [8, 4], [{"tensorParallelSize": 4, "pipelineParallelSize": 3}],
     "models[0].tensorParallelSize", "same GPU count"),
    ("two-spanning-replicas", [8, 8, 8, 8], [{"tensorParallelSize": 8, "pipelineParallelSize": 2, "replicas": 2}],
     "models[0].replicas", "one replica"),
    ("two-fill-models", [8, 8], [{"replicas": 0, "tensorParallelSize": 4}, {"replicas": 0, "tensorParallelSize": 4}],
     "models[1].replicas", "only one model"),
]


@pytest.mark.parametrize("case,gpus,models,key,fix", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_placement_refusals_name_the_key(case, gpus, models, key, fix):
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(_stack(gpus, models))
    message = str(raised.value)
    assert f"vllm-dcu:{key}" in message and fix in message, message


def _signature(values: dict) -> dict[str, str]:
    run = run_program(values, stack="dev")
    assert run.error is None, run.error
    return {r.name: json.dumps(r.inputs, sort_keys=True) for r in run.resources}


def test_a_replica_count_change_touches_only_that_models_resources():
    base = stack_config(REPO / "Pulumi.dev.yaml")
    base["models"] = [{"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 4, "replicas": 2},
                      {"id": "meta-llama/Llama-3.1-8B-Instruct", "tensorParallelSize": 2, "replicas": 2}]
    grown = json.loads(json.dumps(base))
    grown["models"][1]["replicas"] = 4
    before, after = _signature(base), _signature(grown)
    added = set(after) - set(before)
    assert added == {f"vllm-server-Llama-3.1-8B-Instruct-{k}-{role}" for k, role in
                     itertools.product((2, 3), ("container", "healthy", "routed"))}
    assert not set(before) - set(after)
    assert {name for name in before if before[name] != after[name]} == set(), \
        "growing one model must not move the others (nor Ray, nor the gateway)"
