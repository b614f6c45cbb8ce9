"""updateStrategy: blueGreen — one replica with room for a second copy on its node: a change starts a new
copy beside the running one (on the slot it does not hold), routes to it, then removes the old copy."""

import json

import pytest

from components.config import ConfigError, parse_stack_config
from components.plan import make_plan
from tests.support.pulumi_program import REPO, run_program, stack_config
from tests.unit.test_placement import _stack
from tests.unit.test_program import env_of


def _dev(**model) -> dict:
    values = stack_config(REPO / "Pulumi.dev.yaml")
    values["models"] = [{"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 4, "updateStrategy": "blueGreen", **model}]
    return values


def test_the_plan_keeps_a_spare_slot_beside_the_replica():
    plan = make_plan(parse_stack_config(_stack([8, 8], [{"tensorParallelSize": 4, "updateStrategy": "blueGreen"},
                                                        {"tensorParallelSize": 2}])))
    (replica,) = plan.models[0].replicas
    assert replica.nodes == ("n0",) and replica.slots == (((0, 1, 2, 3), 8100), ((4, 5, 6, 7), 8200))
    (other,) = plan.models[1].replicas
    assert (other.nodes, other.devices) == (("n1",), (0, 1))
    # No other model gets a device of the spare: with one node there is none left for it.
    with pytest.raises(ConfigError, match=r"models\[1\].replicas: replica 1 of 1 .* does not fit"):
        parse_stack_config(_stack([8], [{"tensorParallelSize": 4, "updateStrategy": "blueGreen"}, {"tensorParallelSize": 4}]))


@pytest.mark.parametrize("model,fix", [
    ({"replicas": 2}, "several replicas roll one at a time anyway"),
    ({"tensorParallelSize": 8, "pipelineParallelSize": 2}, "no spare node"),
    ({"tensorParallelSize": 8}, "blueGreen needs room for a second copy (8 devices)"),
])
def test_refusals_name_update_strategy(model, fix):
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(_stack([8, 8], [{"updateStrategy": "blueGreen", "tensorParallelSize": 4, **model},
                                           {"tensorParallelSize": 8}]))
    assert "vllm-dcu:models[0].updateStrategy" in str(raised.value) and fix in str(raised.value), str(raised.value)


def _servers(run):
    return {r.name: r for r in run.resources if "-server-Qwen2.5-7B-Instruct-0" in r.name}


def test_a_copy_is_named_after_its_settings():
    before = run_program(_dev(), stack="dev")
    changed = _dev(maxNumSeqs=64)
    after = run_program(changed, stack="dev")
    assert before.error is None and after.error is None
    old, new = _servers(before), _servers(after)
    # No name in common: the change is a new copy (created) and the old one removed at the end.
    assert len(old) == len(new) == 3 and not set(old) & set(new)
    container = next(r for name, r in new.items() if name.endswith("-container"))
    generation = container.name.removeprefix("vllm-server-Qwen2.5-7B-Instruct-0-").removesuffix("-container")
    assert len(generation) == 8 and container.inputs["name"] == f"vllm-server-Qwen2.5-7B-Instruct-0-{generation}"
    env = env_of(container)
    assert env["HIP_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # both slots; the launcher keeps its own
    spec = json.loads(env["NODE_RUNTIME_SERVE_SPEC"])
    assert spec["slots"] == [{"devices": [0, 1, 2, 3], "port": 8100}, {"devices": [4, 5, 6, 7], "port": 8200}]
    assert spec["slot_lock_dir"] == "/data/vllm-dcu/slots"
    mounts = {m["source"] for m in container.inputs["mounts"]}
    assert "/data/vllm-dcu/slots" in mounts
    routed = next(r for name, r in new.items() if name.endswith("-routed"))
    assert f"--replica Qwen2.5-7B-Instruct/0-{generation}" in routed.inputs["delete"]
    assert f"Qwen2.5-7B-Instruct-0-{generation}.json" in routed.inputs["delete"]
    # The route's URL is what the copy's health gate printed (the slot its launcher took).
    healthy = next(r for name, r in new.items() if name.endswith("-healthy"))
    assert after.depends_on(routed, healthy) and "/tmp/node-runtime-url" in healthy.inputs["create"]
    assert "mkdir -p /data/models /data/vllm-dcu/ray /data/vllm-dcu/slots" in after.named("vllm-dcu-head-preflight").inputs["create"]


def test_the_same_settings_keep_the_same_copy():
    first, second = run_program(_dev(), stack="dev"), run_program(_dev(), stack="dev")
    assert set(_servers(first)) == set(_servers(second))
