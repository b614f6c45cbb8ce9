"""Every refusal in full: each bad stack of the validation, placement and blue-green tables, and a few
more, gives exactly the problem lines recorded in tests/unit/recorded/problems.json — every key, every
word of every fix, and no other line; an accepted value, what it parses to. Those tables check a key and a
word; this checks the whole message.

A message changed on purpose is re-recorded (`python -m tests.unit.test_problems_recorded`) and
reviewed in the diff.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from components.config import ConfigError, parse_stack_config
from components.schema import shm_size_mb
from tests.support.pulumi_program import REPO, stack_config
from tests.unit.test_config_validation import BAD_CONFIGS, _add_model, _add_worker, _set
from tests.unit.test_placement import REFUSALS, _stack

RECORDED = Path(__file__).parent / "recorded" / "problems.json"
DEV = stack_config(REPO / "Pulumi.dev.yaml")
LOCAL = stack_config(REPO / "Pulumi.local.yaml")


def _on(base: dict, *mutations) -> dict:
    values = copy.deepcopy(base)
    for mutate in mutations:
        mutate(values)
    return values


def _keys(entries):
    return _set("apiKeys", entries)


GOOD_KEY = "k" * 24
# Bad stacks beyond the tables: (id, values).
MORE = [
    ("api-keys-not-a-list", _on(DEV, _keys("name=key"))),
    ("api-keys-not-objects", _on(DEV, _keys(["a", "b"]))),
    ("api-key-value-missing", _on(DEV, _keys([{"name": "a"}, {"name": "b", "key": ""}]))),
    ("api-key-value-short-or-spaced", _on(DEV, _keys([{"name": "a", "key": "short"},
                                                      {"name": "b", "key": "k" * 20 + " " + "k" * 3}]))),
    ("api-key-value-repeated", _on(DEV, _keys([{"name": "a", "key": GOOD_KEY}, {"name": "b", "key": "x" * 16},
                                               {"name": "c", "key": GOOD_KEY}]))),
    ("api-key-unknown-model-of-two", _on(DEV, _add_model(id="org/b", tensorParallelSize=8),
                                         _keys([{"name": "a", "key": GOOD_KEY, "models": ["m1"]}]))),
    ("api-key-unknown-model", _on(DEV, _keys([{"name": "a", "key": GOOD_KEY, "models": ["m1", "Llama-3.1-70B-Instruct", "m2"]}]))),
    ("worker-is-head-and-duplicates", _on(DEV, _set("workers[0].address", "10.0.0.11"), _set("workers[1].address", "10.0.0.11"),
                                          _set("workers[1].name", "dcu-head"))),
    ("cpu-gpus-on-worker", _on(LOCAL, _set("localDocker", False), _set("workers", [{"address": "10.0.0.5", "gpus": 2}]))),
    ("extra-env-on-head-and-stack", _on(DEV, _set("extraEnv", {"HF_HUB_OFFLINE": "0", "NCCL_DEBUG": "INFO"}),
                                        _set("head.extraEnv", {"RAY_NODE_IP_ADDRESS": "1.2.3.4"}))),
    ("extra-env-rocm-path", _on(DEV, _set("extraEnv", {"ROCM_PATH": "/opt/rocm"}))),
    ("api-port-and-check-port-collide", _on(DEV, _set("apiPort", 8076), _set("clusterCheckPort", 8076))),
    ("model-ports", _on(DEV, _add_model(port=8076, tensorParallelSize=8), _add_model(port=29555, tensorParallelSize=8),
                        _add_model(port=8000, tensorParallelSize=8))),
    ("quantization-on-cpu", _on(LOCAL, _set("models[0].quantization", "slimquant_marlin"))),
    ("two-replicas-one-port", _stack([8], [{"tensorParallelSize": 2, "replicas": 2, "port": 8200},
                                           {"tensorParallelSize": 2, "port": 8300}])),
    ("blue-green-no-room", _stack([8], [{"tensorParallelSize": 8, "updateStrategy": "blueGreen"}])),
    ("blue-green-two-replicas", _stack([8, 8], [{"tensorParallelSize": 4, "updateStrategy": "blueGreen", "replicas": 2}])),
    ("blue-green-spanning", _stack([8, 8], [{"tensorParallelSize": 8, "pipelineParallelSize": 2,
                                             "updateStrategy": "blueGreen"}])),
    # Allowed: the same port on two nodes (a's third replica takes 8200 on n0, b's first 8200 on n1).
    ("same-port-other-nodes", _stack([8, 8], [{"tensorParallelSize": 4, "replicas": 3, "port": 8100},
                                              {"tensorParallelSize": 4, "port": 8200}])),
    ("cpu-several-processes", _on(LOCAL, _set("models[0].pipelineParallelSize", 2))),
    # A CPU blue-green spare is on its replica's node: another model's port there is a clash.
    ("cpu-spare-port-clash", _stack([0, 0], [{"updateStrategy": "blueGreen", "port": 8100}, {"port": 8200}],
                                    accelerator="cpu")),
    # Allowed: replicas 0 of a layout spanning nodes is its one replica.
    ("spanning-replicas-0", _stack([8, 8], [{"tensorParallelSize": 8, "pipelineParallelSize": 2, "replicas": 0}])),
    # Allowed: on CPU every model can have a replica per node.
    ("fill-on-cpu-twice", _stack([0, 0], [{"replicas": 0}, {"replicas": 0}], accelerator="cpu")),
    ("too-many-gpus-for-a-node", _stack([8, 4], [{"tensorParallelSize": 8, "replicas": 2}])),
]
# One key's value each (components/schema.py): refused ones with their whole message, accepted ones with none.
VALUES = [
    ("dtype", _set("models[0].dtype", d)) for d in ("auto", "half", "float16", "bfloat16", "float", "float32", "fp8")
] + [
    ("extra-args", _set("models[0].extraArgs", [flag, "--enforce-eager"])) for flag in (
        "--model", "--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp", "--pipeline-parallel-size",
        "-pp", "--distributed-executor-backend", "--quantization", "-q", "--dtype", "--max-num-seqs",
        "--max-num-batched-tokens", "--max-model-len", "--gpu-memory-utilization", "--api-key", "--api-key=x",
        "--seed=1", "-O3")
] + [
    ("ulimit", _set("ulimits", {name: value})) for name in (
        "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss", "rtprio",
        "rttime", "sigpending", "stack") for value in (-1,)
] + [
    ("ulimit-value", _set("ulimits", {"nofile": value})) for value in (
        65536, "1024:2048", "-1:-1", "5:-1", "-1:5", "10:5", "-2", "1:2:3", "x", True, 1.5, [1], "", "4096")
] + [
    ("shm-size", _set("shmSize", value)) for value in ("64g", "512m", "16GB", "1024k", "2048k", "2048", "3145728", " 8G ", "1t", "0m", "g")
] + [
    ("model-id", _set("models[0].id", value)) for value in ("llama", "a/b", "a/b/c", "a//b", "-a/b", "a/" + "b" * 64)
] + [
    ("local-source", _set("models[0]", value)) for value in (
        {"id": "x", "source": "local", "localPath": "/srv/x/"}, {"id": "x", "source": "local"},
        {"id": "x", "source": "modelscope", "localPath": "/srv/x"})
] + [
    ("ray-ports", _set("rayPorts", value)) for value in (
        {"minWorker": 10000, "maxWorker": 10000}, {"gcs": 8265}, {"gcs": 10002}, {"dashboard": 19999},
        {"minWorker": 30000, "maxWorker": 40000}, {"runtimeEnvAgent": 6379}, {"clientServer": 10001})
] + [
    ("api-key-name", _keys([{"name": name, "key": GOOD_KEY}])) for name in ("none", "default", "team a", "team-a")
] + [
    ("api-key-names-repeated", _keys([{"name": n, "key": c * 20} for n, c in (("b", "1"), ("a", "2"), ("b", "3"), ("a", "4"))])),
    ("api-key-limits", _keys([{"name": "a", "key": GOOD_KEY, "models": [], "requestsPerMinute": 0, "tokensPerMinute": 0}])),
] + [
    ("base-image-id", _set("baseImageId", value)) for value in ("sha256:" + "0" * 64, "sha256:abc", "sha256:" + "a" * 64)
] + [
    ("base-image-by-id", lambda c, image=image: c.update(baseImageId="sha256:" + "c" * 64, baseImage=image))
    for image in ("harbor.example/vllm:1", "harbor.example/vllm:1@sha256:" + "ab" * 32)
] + [
    ("nodes-pull-base", lambda c, extra=extra: c.update(nodesPullBase=True, **extra)) for extra in (
        {}, {"baseImageId": "sha256:" + "c" * 64, "baseImage": "harbor.example/vllm:1"},
        {"imageRegistry": "registry.local:5000/vllm"}, {"imageTransfer": "stream"})
] + [
    ("image-registry", _set("imageRegistry", value)) for value in (
        "registry.local:5000/vllm-dcu", "localhost/vllm", "docker.io/me/vllm", "registry.local/vllm@sha256:" + "ab" * 32,
        "Registry.local/vllm")
] + [
    ("driver-version", _set("minDriverVersion", value)) for value in ("6.3.8", "6", "6.3.8-V1.5.2", "6.3.", "v6.3")
] + [
    ("url", _set("hfEndpoint", value)) for value in ("https://hf-mirror.com/", "http://10.0.0.1:8080/hf", "ftp://x", "https://")
] + [
    ("cluster-name", _set("clusterName", value)) for value in ("Edge", "edge-1", "e" * 64)
] + [
    ("update-strategy", _set("models[0].updateStrategy", value)) for value in ("rolling", "blue-green")
] + [
    ("source", _set("models[0].source", value)) for value in ("huggingface", "modelscope")
] + [
    ("address", _set("head.address", value)) for value in ("fd00::1", "010.0.0.1", "10.0.0.256")
] + [
    ("label", _set("head", {"address": value, "gpus": 8})) for value in ("fd00::0:1", "10.0.0.1")
] + [
    ("paths", _set(key, value)) for key, value in (("modelRoot", "/data//models/"), ("dataRoot", "relative"),
                                                   ("extraDevices", ["/dev/infiniband", "dev/x"]))
] + [
    ("env", _set("extraEnv", value)) for value in ({"A": 1.5}, {"A": None}, {"A": ["x"]}, {"1A": "x"}, {"_A": "x"})
] + [
    ("interface", _set("ncclSocketIfname", value)) for value in ("^docker,lo", "=eth0", "e" * 65, "")
] + [
    ("limits", _set(key, value)) for key, value in (
        ("apiPort", 10002), ("apiPort", 19999), ("apiPort", 10001), ("apiPort", 20000),
        ("accessLogPercent", 101), ("accessLogPercent", 100), ("gatewayWorkers", 65), ("gatewayWorkers", 64),
        ("maxN", 0), ("maxBatchTokens", 0), ("maxRequestBodyMb", 0), ("maxHeaderKb", 0), ("imageRelayPort", 0),
        ("timeouts", {"modelDownload": 0, "serverReady": 0, "request": 0, "drain": 0, "bodyRead": 0}),
        ("models[0].maxNumBatchedTokens", 0), ("models[0].gpuMemoryUtilization", 0), ("models[0].replicas", -1))
]
MORE += [(f"value:{name}:{i}", _on(DEV, mutate)) for i, (name, mutate) in enumerate(VALUES)]


def _cases() -> dict[str, dict]:
    cases = {}
    for case, mutate, *_ in BAD_CONFIGS:
        cases[f"config:{case}"] = _on(DEV, mutate)
    for case, gpus, models, *_ in REFUSALS:
        cases[f"placement:{case}"] = _stack(gpus, models)
    for case, values in MORE:
        cases[f"more:{case}"] = values
    return cases


DEV_PARSED = parse_stack_config(copy.deepcopy(DEV)).model_dump(mode="json")


def problems_of(values: dict) -> list[str] | dict:
    """The problem lines of a refused stack; of an accepted one, what it parsed to beside the dev stack."""
    try:
        config = parse_stack_config(copy.deepcopy(values))
    except ConfigError as error:
        assert str(error) == "invalid stack configuration:\n" + "\n".join(f"  - {p}" for p in error.problems)
        return error.problems
    parsed = config.model_dump(mode="json")
    return {"accepted": {key: value for key, value in parsed.items() if DEV_PARSED.get(key) != value},
            "shm_size_mb": shm_size_mb(config.shm_size),
            "models": [[model.name, model.directory] for model in config.models],
            "nodes": [node.label for node in config.nodes]}


CASES = _cases()


def test_every_case_is_recorded():
    assert sorted(json.loads(RECORDED.read_text())) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_problems_are_the_recorded_ones(case):
    recorded = json.loads(RECORDED.read_text())
    assert problems_of(CASES[case]) == recorded[case]


if __name__ == "__main__":
    RECORDED.parent.mkdir(exist_ok=True)
    RECORDED.write_text(json.dumps({case: problems_of(values) for case, values in sorted(CASES.items())},
                                   indent=1, ensure_ascii=False) + "\n")
    print(f"recorded {len(CASES)} cases in {RECORDED}")
