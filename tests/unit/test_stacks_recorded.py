"""Whole plans, specs and scripts: for a few stacks that between them use every key the plan and the
specs read, the parsed config, the plan, every container spec, Ray command line, serve spec, gateway
config, and the preflight and facts scripts are exactly those recorded in tests/unit/recorded/stacks.json.

The graph test (test_graph.py) records the dev and local stacks as the engine sees them; this one
adds stacks with the other settings (cluster addresses, derived interfaces, blue-green, mountDtk,
ulimits, extraEnv, several models per node, IPv6 gateway bind) and the values that never reach a
resource input. A change made on purpose is re-recorded
(`python -m tests.unit.test_stacks_recorded`) and reviewed in the diff.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest

from components.checks import stack_warnings
from components.config import parse_stack_config
from components.plan import make_plan
from components.preflight import HostFacts, facts_script, parse_facts, preflight_script
from components.specs import (
    api_key_values, gateway_config, gateway_container_spec, generation, managed_env, node_container_spec,
    ray_start_command, serve_spec, server_container_spec,
)
from tests.support.pulumi_program import REPO, stack_config

RECORDED = Path(__file__).parent / "recorded" / "stacks.json"
DEV = stack_config(REPO / "Pulumi.dev.yaml")
LOCAL = stack_config(REPO / "Pulumi.local.yaml")
DIGEST = "@sha256:" + "ab" * 32


def _dev(**changes) -> dict:
    values = copy.deepcopy(DEV)
    values.update(changes)
    return values


def _vendor() -> dict:
    """Cluster addresses, interfaces left to derive, vendor settings, mountDtk, a driver minimum."""
    values = _dev(mountDtk=True, privileged=True, ulimits={"memlock": -1, "stack": "67108864:-1", "nofile": 65536},
                  extraEnv={"NCCL_IB_HCA": "mlx5_0:1", "NCCL_MIN_NCHANNELS": 16}, extraDevices=["/dev/infiniband"],
                  minDriverVersion="6.3.8", sshUser="ops", sshPort=2222, clusterName="edge", apiPort=9000,
                  apiBindAddress="::", maxBatchSize=8, maxN=4, maxBatchTokens=1000, maxRequestBodyMb=2, maxHeaderKb=8,
                  accessLogPercent=5, gatewayWorkers=2, timeouts={"request": 60, "bodyRead": 5, "clusterReady": 300},
                  models=[{"id": "meta-llama/Llama-3.1-8B-Instruct", "tensorParallelSize": 8, "pipelineParallelSize": 2,
                           "quantization": "int8", "maxNumBatchedTokens": 8192, "extraArgs": ["--enforce-eager"]},
                          {"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 4, "updateStrategy": "blueGreen",
                           "servedName": "qwen", "port": 8300, "dtype": "float16"}])
    for key in ("ncclSocketIfname", "glooSocketIfname"):
        values.pop(key, None)
    values["head"] = {**values["head"], "clusterAddress": "192.168.50.11", "sshUser": "root",
                      "extraEnv": {"NCCL_IB_HCA": "mlx5_2:1"}}
    values["workers"] = [{**w, "clusterAddress": f"192.168.50.{12 + i}"} for i, w in enumerate(values["workers"])]
    values["workers"][1] = {**values["workers"][1], "interface": "ib1", "sshPort": 22022}
    return values


def _four_nodes() -> dict:
    """Several replicas and models per node, a model filling what is left, a named gateway bind."""
    values = {
        "accelerator": "dcu", "baseImage": "harbor.example/vllm:0.9.2" + DIGEST, "apiBindAddress": "10.0.0.1",
        "ncclSocketIfname": "ib", "glooSocketIfname": "eth0,eth1",
        "head": {"address": "10.0.0.1", "name": "n0", "gpus": 8},
        "workers": [{"address": f"10.0.0.{i + 1}", "name": f"n{i}", "gpus": 8, **({"interface": "ib^0"} if i == 2 else {})}
                    for i in range(1, 4)],
        "models": [{"id": "org/a", "tensorParallelSize": 4, "replicas": 3, "source": "modelscope", "revision": "v1"},
                   {"id": "org/b", "tensorParallelSize": 2, "replicas": 2, "allowPatterns": ["*.json"]},
                   {"id": "org/c", "tensorParallelSize": 1, "replicas": 0, "source": "local", "localPath": "/srv/c"}],
        "apiKeys": [{"name": "team-a", "key": "k" * 24, "models": ["a"], "requestsPerMinute": 10},
                    {"name": "team-b", "key": "j" * 24, "tokensPerMinute": 1000}],
    }
    return values


def _cpu_two_nodes() -> dict:
    values = copy.deepcopy(LOCAL)
    values.update(localDocker=False, head={"address": "10.1.0.1", "gpus": 0},
                  workers=[{"address": "10.1.0.2"}], models=[{"id": "org/tiny", "replicas": 3},
                                                             {"id": "org/spare", "updateStrategy": "blueGreen"}])
    return values


def _two_sizes() -> dict:
    """Nodes of 8 and 6 devices: TP 3 takes the lowest free run on the node of 8 (no multiple of 3: a,
    replica 2 on devices 3-5), aligned blocks on the node of 6; a model filling what is left."""
    values = _four_nodes()
    values.update(head={"address": "10.0.0.1", "name": "n0", "gpus": 8},
                  workers=[{"address": "10.0.0.2", "name": "n1", "gpus": 6}], apiKeys=[],
                  models=[{"id": "org/a", "tensorParallelSize": 3, "replicas": 3},
                          {"id": "org/c", "tensorParallelSize": 1, "replicas": 0}])
    return values


def _spread() -> dict:
    """A model's second replica goes to the node without one (n0), not to the emptier node (n1)."""
    values = _two_sizes()
    values.update(workers=[{"address": "10.0.0.2", "name": "n1", "gpus": 8}],
                  models=[{"id": "org/a", "tensorParallelSize": 4}, {"id": "org/b", "tensorParallelSize": 2, "replicas": 2}])
    return values


def _tie() -> dict:
    """Nodes of 8 and 4: the second model finds both with 4 free and no replica of its own; the head wins."""
    values = _two_sizes()
    values.update(workers=[{"address": "10.0.0.2", "name": "n1", "gpus": 4}],
                  models=[{"id": "org/a", "tensorParallelSize": 4}, {"id": "org/b", "tensorParallelSize": 4}])
    return values


def _one_node_nccl() -> dict:
    """One node with only NCCL's interface set: Gloo's is left to the library, and not checked."""
    values = _two_sizes()
    values.update(workers=[], ncclSocketIfname="ib0", models=[{"id": "org/a"}])
    values.pop("glooSocketIfname")
    return values


STACKS = {"dev": lambda: copy.deepcopy(DEV), "local": lambda: copy.deepcopy(LOCAL), "vendor": _vendor,
          "four-nodes": _four_nodes, "cpu-two-nodes": _cpu_two_nodes, "two-sizes": _two_sizes,
          "spread": _spread, "tie": _tie, "one-node-nccl": _one_node_nccl}
FACTS = HostFacts(devices=("/dev/mkfd",), interface="ib0", driver="6.3.8")


def _plain(value):
    """JSON-ready: dataclasses as dicts, tuples as lists, pydantic models dumped."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record(values: dict) -> dict:
    """Everything the program derives from one stack's values, plain."""
    secrets = values.get("apiKeys")
    config = parse_stack_config(values)
    plan = make_plan(config)
    nodes = {}
    for node in plan.nodes:
        base = node_container_spec(plan, node, "ray-" + node.label, ["ray"], node.ray_devices)
        nodes[node.label] = {
            "plan": _plain(node), "where": node.where, "ssh": str(node.ssh), "ssh_url": node.ssh.url,
            "nccl": node.nccl_interface, "gloo": node.gloo_interface,
            "ray_start": ray_start_command(plan, node),
            "container": _plain(base), "depends_on_host": base.depends_on_host,
            "on_host": _plain(base.on_host(FACTS)), "on_bare_host": _plain(base.on_host(HostFacts())),
            "preflight": preflight_script(plan, node).splitlines(),
            "facts": facts_script(plan, node).splitlines(),
        }
    models = {}
    for model in plan.models:
        models[model.name] = {
            "index": model.index, "directory": model.directory, "path": plan.model_path(model.model),
            "layout": _plain(model.layout), "world_size": model.layout.world_size,
            "replicas": [{
                "plan": {k: v for k, v in _plain(replica).items() if k != "home"}, "home": replica.home.label,
                "url": replica.url, "slots": _plain(replica.slots),
                "serve_spec": serve_spec(plan, model, replica),
                "container": _plain(server_container_spec(plan, model, replica)),
                "generation": generation(server_container_spec(plan, model, replica), "tag"),
            } for replica in model.replicas],
        }
    return {
        "config": config.model_dump(mode="json"),
        "warnings": stack_warnings(config),
        "paths": {name: getattr(plan, name) for name in (
            "ray_temp_dir", "relay_key_path", "gateway_dir", "slot_lock_dir", "routes_dir", "internal_key_path",
            "gateway_metrics_url", "dashboard_url", "gateway_url")},
        "cluster": _plain(plan.cluster), "fabric": _plain(plan.fabric), "output": plan.as_output(),
        "model_stores": {directory: model.name for directory, model in plan.model_stores.items()},
        "nodes": nodes, "models": models,
        "gateway": {"config": gateway_config(plan), "container": _plain(gateway_container_spec(plan))},
        "api_key_values": api_key_values(json.dumps(secrets)) if secrets else None,
        "managed_env": managed_env(plan.profile),
    }


def test_every_stack_is_recorded():
    assert sorted(json.loads(RECORDED.read_text())) == sorted(STACKS)


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_the_stack_is_the_recorded_one(stack):
    recorded = json.loads(RECORDED.read_text())[stack]
    now = json.loads(json.dumps(record(STACKS[stack]())))
    for part in recorded:  # part by part, so a failure names what changed
        assert now[part] == recorded[part], part
    assert now == recorded




@pytest.mark.parametrize("stack", sorted(STACKS))
def test_the_scripts_parse(stack):
    import subprocess

    plan = make_plan(parse_stack_config(STACKS[stack]()))
    for node in plan.nodes:
        for script in (preflight_script(plan, node), facts_script(plan, node)):
            checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
            assert checked.returncode == 0, (node.label, checked.stderr)


def test_specs_are_values():
    """A spec is shared by every container built from it (on_host and replace copy it): it cannot change."""
    from dataclasses import FrozenInstanceError

    plan = make_plan(parse_stack_config(STACKS["dev"]()))
    spec = node_container_spec(plan, plan.head, "ray-head", ["ray"], ())
    with pytest.raises(FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    assert spec.on_host(FACTS) is not spec and spec.optional_devices == ["/dev/mkfd"]


def test_every_derived_value_is_frozen():
    """The plan's values are worked out once and shared (components/plan.py): none can be changed in place."""
    from components import accelerators, config, placement, plan, preflight, specs

    values = [accelerators.HostPath, accelerators.Profile, config.Secrets, placement.Demand, placement.Slot,
              plan.SshTarget, plan.Layout, plan.Interface, plan.NodePlan, plan.ReplicaPlan, plan.ModelPlan,
              plan.FabricCheck, plan.ClusterReadiness, plan.Plan, preflight.HostFacts, specs.ContainerSpec]
    assert [cls.__name__ for cls in values if not cls.__dataclass_params__.frozen] == []


def test_facts_lines_without_a_value_are_none():
    assert parse_facts("device=\ninterface=\ndriver=\nunknown=x\n") == HostFacts()
    assert parse_facts(" device=/dev/mkfd \ninterface=ib0\ndriver=6.3.8\ndevice=/dev/x\n") == HostFacts(
        ("/dev/mkfd", "/dev/x"), "ib0", "6.3.8")


if __name__ == "__main__":
    RECORDED.parent.mkdir(exist_ok=True)
    RECORDED.write_text(json.dumps({name: record(make()) for name, make in STACKS.items()}, indent=1) + "\n")
    print(f"recorded {len(STACKS)} stacks in {RECORDED}")
