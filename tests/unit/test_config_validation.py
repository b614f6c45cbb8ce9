"""Every invalid stack config stops the program before anything is created, naming the key."""

import copy

import pytest

from components.config import ConfigError, parse_stack_config
from tests.support.pulumi_program import REPO, run_program, stack_config

DIGEST = "@sha256:" + "ab" * 32


def _set(path: str, value):
    """A mutation that sets one (dotted, indexed) key; value None deletes it."""

    def mutate(config: dict) -> None:
        parts = path.replace("]", "").replace("[", ".").split(".")
        target = config
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        if value is None:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


def _add_model(**fields):
    def mutate(config: dict) -> None:
        config["models"].append({"id": "Qwen/Qwen2.5-7B-Instruct", **fields})

    return mutate


def _add_worker(**fields):
    def mutate(config: dict) -> None:
        config["workers"].append(fields)

    return mutate


# (case id, mutation of the dev stack, the stack key the message must name, a word of the fix)
BAD_CONFIGS = [
    ("head-missing", _set("head", None), "vllm-dcu:head", "required"),
    ("head-address-malformed", _set("head.address", "10.0.0"), "vllm-dcu:head.address", "IP address"),
    ("head-address-hostname", _set("head.address", "dcu-head.local"), "vllm-dcu:head.address", "IP address"),
    ("worker-address-malformed", _set("workers[0].address", "10.0.0.300"), "vllm-dcu:workers[0].address", "IP address"),
    ("worker-equals-head", _set("workers[1].address", "10.0.0.11"), "vllm-dcu:workers[1].address", "cannot be the head"),
    ("duplicate-workers", _set("workers[1].address", "10.0.0.12"), "vllm-dcu:workers[1].address", "once"),
    ("duplicate-worker-names", _set("workers[1].name", "dcu-worker-1"), "vllm-dcu:workers[1].name", "own name"),
    ("worker-name-invalid", _set("workers[0].name", "worker one"), "vllm-dcu:workers[0].name", "letters"),
    ("head-zero-gpus-dcu", _set("head.gpus", 0), "vllm-dcu:head.gpus", "at least 1"),
    ("worker-negative-gpus", _set("workers[0].gpus", -1), "vllm-dcu:workers[0].gpus", "greater than or equal"),
    ("gpus-on-cpu", _set("accelerator", "cpu"), "vllm-dcu:head.gpus", "gpus: 0"),
    ("unknown-accelerator", _set("accelerator", "cuda"), "vllm-dcu:accelerator", "dcu"),
    ("ssh-port-range", _set("sshPort", 70000), "vllm-dcu:sshPort", "65535"),
    ("node-ssh-port-range", _set("workers[0].sshPort", 0), "vllm-dcu:workers[0].sshPort", "greater than or equal"),
    ("interface-invalid", _set("workers[0].interface", "eth 0"), "vllm-dcu:workers[0].interface", "interface"),
    ("nccl-ifname-invalid", _set("ncclSocketIfname", "eth0;rm"), "vllm-dcu:ncclSocketIfname", "interface"),
    ("image-malformed", _set("baseImage", "Harbor//vllm::1"), "vllm-dcu:baseImage", "image reference"),
    ("image-unpinned", _set("baseImage", "harbor.sourcefind.cn:5443/dcu/admin/base/vllm:0.9.2"), "vllm-dcu:baseImage", "digest"),
    ("image-digest-short", _set("baseImage", "harbor.example/vllm:1@sha256:abc"), "vllm-dcu:baseImage", "image reference"),
    ("registry-with-tag", _set("imageRegistry", "registry.local:5000/vllm:1"), "vllm-dcu:imageRegistry", "repository"),
    ("model-root-relative", _set("modelRoot", "data/models"), "vllm-dcu:modelRoot", "absolute"),
    ("data-root-relative", _set("dataRoot", "~/vllm"), "vllm-dcu:dataRoot", "absolute"),
    ("data-root-equals-model-root", _set("dataRoot", "/data/models"), "vllm-dcu:dataRoot", "differ"),
    ("shm-size-malformed", _set("shmSize", "lots"), "vllm-dcu:shmSize", "16g"),
    ("shm-size-zero", _set("shmSize", "0g"), "vllm-dcu:shmSize", "16g"),
    ("api-port-is-ray-port", _set("apiPort", 6379), "vllm-dcu:apiPort", "rayPorts.gcs"),
    ("api-port-is-dashboard", _set("apiPort", 8265), "vllm-dcu:apiPort", "rayPorts.dashboard"),
    ("api-port-in-worker-range", _set("apiPort", 12000), "vllm-dcu:apiPort", "worker port range"),
    ("api-port-range", _set("apiPort", 0), "vllm-dcu:apiPort", "greater than or equal"),
    ("ray-ports-duplicate", _set("rayPorts", {"gcs": 7000, "dashboard": 7000}), "vllm-dcu:rayPorts", "own port"),
    ("ray-worker-range-inverted", _set("rayPorts", {"minWorker": 20000, "maxWorker": 10000}), "vllm-dcu:rayPorts", "below"),
    ("ray-port-unknown-key", _set("rayPorts", {"redis": 6380}), "vllm-dcu:rayPorts.redis", "unknown key"),
    ("bind-address-malformed", _set("apiBindAddress", "everywhere"), "vllm-dcu:apiBindAddress", "IP address"),
    ("cluster-name-invalid", _set("clusterName", "my cluster"), "vllm-dcu:clusterName", "letters"),
    ("unknown-top-level-key", _set("tensorParallel", 8), "vllm-dcu:tensorParallel", "spelling"),
    ("unknown-model-key", _set("models[0].tp", 8), "vllm-dcu:models[0].tp", "spelling"),
    ("no-models", _set("models", []), "vllm-dcu:models", "at least 1"),
    ("model-id-empty", _set("models[0].id", ""), "vllm-dcu:models[0].id", "at least 1"),
    ("model-id-malformed", _set("models[0].id", "a/b/c"), "vllm-dcu:models[0].id", "owner/name"),
    ("revision-empty", _set("models[0].revision", ""), "vllm-dcu:models[0].revision", "at least 1"),
    ("unknown-source", _set("models[0].source", "s3"), "vllm-dcu:models[0].source", "huggingface"),
    ("unknown-balancing", _set("models[0].balancing", "roundRobin"), "vllm-dcu:models[0].balancing", "speedAware"),
    ("local-without-path", _set("models[0].source", "local"), "vllm-dcu:models[0]", "localPath"),
    ("local-path-relative", _add_model(source="local", localPath="models/x", servedName="x"), "vllm-dcu:models[1].localPath", "absolute"),
    ("local-path-on-hub-source", _set("models[0].localPath", "/srv/llama"), "vllm-dcu:models[0]", "only for source 'local'"),
    ("unknown-quantization", _set("models[0].quantization", "int3"), "vllm-dcu:models[0].quantization", "int8"),
    ("unknown-dtype", _set("models[0].dtype", "fp64"), "vllm-dcu:models[0].dtype", "bfloat16"),
    ("negative-tp", _set("models[0].tensorParallelSize", -1), "vllm-dcu:models[0].tensorParallelSize", "greater than or equal"),
    ("negative-pp", _set("models[0].pipelineParallelSize", -2), "vllm-dcu:models[0].pipelineParallelSize", "greater than or equal"),
    ("tp-pp-too-large", lambda c: c["models"][0].update(tensorParallelSize=16, pipelineParallelSize=2),
     "vllm-dcu:models[0].tensorParallelSize", "cluster has 24"),
    ("tp-not-whole-nodes", _set("models[0].tensorParallelSize", 12), "vllm-dcu:models[0].tensorParallelSize", "whole nodes"),
    ("world-not-whole-nodes", lambda c: c["models"][0].update(tensorParallelSize=4, pipelineParallelSize=3),
     "vllm-dcu:models[0].pipelineParallelSize", "multiple"),
    ("auto-tp-uneven-nodes", _set("workers[1].gpus", 4), "vllm-dcu:models[0].tensorParallelSize", "same GPU count"),
    ("max-num-seqs-zero", _set("models[0].maxNumSeqs", 0), "vllm-dcu:models[0].maxNumSeqs", "greater than or equal"),
    ("gpu-memory-over-one", _set("models[0].gpuMemoryUtilization", 1.5), "vllm-dcu:models[0].gpuMemoryUtilization", "less than or equal"),
    ("max-model-len-zero", _set("models[0].maxModelLen", 0), "vllm-dcu:models[0].maxModelLen", "greater than or equal"),
    ("extra-args-managed-flag", _set("models[0].extraArgs", ["--tensor-parallel-size=4"]), "vllm-dcu:models[0].extraArgs", "tensorParallelSize"),
    ("served-name-invalid", _set("models[0].servedName", "llama 70b"), "vllm-dcu:models[0].servedName", "letters"),
    ("duplicate-served-name", _add_model(servedName="Llama-3.1-70B-Instruct", tensorParallelSize=8, pipelineParallelSize=1),
     "vllm-dcu:models[1].servedName", "distinct"),
    ("same-directory-other-revision", _add_model(id="meta-llama/Llama-3.1-70B-Instruct", revision="v2", servedName="llama-v2", tensorParallelSize=8),
     "vllm-dcu:models[1]", "one revision per directory"),
    ("server-port-is-api-port", _add_model(port=8000, tensorParallelSize=8), "vllm-dcu:models[1].port", "apiPort"),
    ("server-port-is-ray-port", _add_model(port=8265, tensorParallelSize=8), "vllm-dcu:models[1].port", "rayPorts.dashboard"),
    ("two-models-one-port", _add_model(port=8100, tensorParallelSize=8), "vllm-dcu:models[1].port", "collides"),
    ("server-port-base-on-ray", _set("serverPortBase", 6379), "vllm-dcu:serverPortBase", "rayPorts.gcs"),
    ("timeout-zero", _set("timeouts", {"clusterReady": 0}), "vllm-dcu:timeouts.clusterReady", "greater than or equal"),
    ("min-free-disk-negative", _set("minFreeDiskGb", -5), "vllm-dcu:minFreeDiskGb", "greater than or equal"),
    ("max-batch-zero", _set("maxBatchSize", 0), "vllm-dcu:maxBatchSize", "greater than or equal"),
    ("gateway-workers-zero", _set("gatewayWorkers", 0), "vllm-dcu:gatewayWorkers", "greater than or equal"),
    ("worker-extra-key", _add_worker(address="10.0.0.14", gpus=8, gpu=8), "vllm-dcu:workers[2].gpu", "spelling"),
    # Issue 11: held-out holes, vendor settings, network identity, the fabric check, quantization per profile.
    ("local-docker-with-workers", _set("localDocker", True), "vllm-dcu:localDocker", "remove workers"),
    ("cluster-name-upper-case", _set("clusterName", "VLLM-node"), "vllm-dcu:clusterName", "'vllm-node'"),
    ("registry-without-host", _set("imageRegistry", "myorg/vllm-dcu"), "vllm-dcu:imageRegistry", "registry host"),
    ("registry-bare-name", _set("imageRegistry", "vllm-dcu"), "vllm-dcu:imageRegistry", "host[:port]/path"),
    ("image-digest-all-zeros", _set("baseImage", "harbor.example/vllm:1@sha256:" + "0" * 64), "vllm-dcu:baseImage",
     "placeholder"),
    ("extra-env-sets-interface", _set("extraEnv", {"NCCL_SOCKET_IFNAME": "ib0"}),
     "vllm-dcu:extraEnv.NCCL_SOCKET_IFNAME", "ncclSocketIfname"),
    ("extra-env-sets-host-ip", _set("extraEnv", {"VLLM_HOST_IP": "10.0.0.11"}), "vllm-dcu:extraEnv.VLLM_HOST_IP",
     "clusterAddress"),
    ("node-extra-env-sets-devices", _set("workers[0].extraEnv", {"HIP_VISIBLE_DEVICES": "0"}),
     "vllm-dcu:workers[0].extraEnv.HIP_VISIBLE_DEVICES", "devices it owns"),
    ("extra-env-sets-cuda-devices", _set("extraEnv", {"CUDA_VISIBLE_DEVICES": "0"}),
     "vllm-dcu:extraEnv.CUDA_VISIBLE_DEVICES", "devices it owns"),
    ("extra-env-sets-noset", _set("extraEnv", {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "0"}),
     "vllm-dcu:extraEnv.RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "dcu profile"),
    ("extra-env-bad-name", _set("extraEnv", {"NCCL IB": "x"}), "vllm-dcu:extraEnv.NCCL IB:", "environment variable name"),
    ("extra-env-boolean", _set("extraEnv", {"NCCL_NET_GDR_READ": True}), "vllm-dcu:extraEnv.NCCL_NET_GDR_READ", "quote"),
    ("extra-device-relative", _set("extraDevices", ["dev/infiniband"]), "vllm-dcu:extraDevices[0]", "absolute"),
    ("ulimit-unknown", _set("ulimits", {"memlok": -1}), "vllm-dcu:ulimits.memlok:", "'memlock'"),
    ("ulimit-soft-over-hard", _set("ulimits", {"nofile": "65536:1024"}), "vllm-dcu:ulimits.nofile", "soft limit"),
    ("ulimit-malformed", _set("ulimits", {"memlock": "lots"}), "vllm-dcu:ulimits.memlock", "-1 (unlimited)"),
    ("cluster-address-malformed", _set("workers[0].clusterAddress", "ib-net"), "vllm-dcu:workers[0].clusterAddress",
     "IP address"),
    ("cluster-address-duplicate", _set("workers[1].clusterAddress", "10.0.0.12"), "vllm-dcu:workers[1].clusterAddress",
     "its own address"),
    ("cluster-check-port-on-ray", _set("clusterCheckPort", 8265), "vllm-dcu:clusterCheckPort", "rayPorts.dashboard"),
    ("cluster-check-port-is-api-port", _set("clusterCheckPort", 8000), "vllm-dcu:clusterCheckPort", "apiPort"),
    ("server-port-is-check-port", _add_model(port=29555, tensorParallelSize=8), "vllm-dcu:models[1].port",
     "clusterCheckPort"),
    ("ray-agent-port-in-worker-range", _set("rayPorts", {"runtimeEnvAgent": 12000}), "vllm-dcu:rayPorts",
     "worker port range"),
    ("ray-agent-ports-duplicate", _set("rayPorts", {"dashboardAgentGrpc": 8076}), "vllm-dcu:rayPorts", "own port"),
    ("cluster-check-timeout-short", _set("timeouts", {"clusterCheck": 5}), "vllm-dcu:timeouts.clusterCheck",
     "greater than or equal"),
    ("quantization-not-on-dcu", _set("models[0].quantization", "bitsandbytes"), "vllm-dcu:models[0].quantization",
     "slimquant_marlin"),
    ("min-driver-version-malformed", _set("minDriverVersion", "latest"), "vllm-dcu:minDriverVersion", "6.3.8"),
]


@pytest.mark.parametrize("case,mutate,key,fix", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_key_and_fix(dev_config, case, mutate, key, fix):
    mutate(dev_config)
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(dev_config)
    message = str(raised.value)
    assert key in message, message
    assert fix in message, message


def test_table_covers_at_least_forty_distinct_cases():
    assert len({case for case, *_ in BAD_CONFIGS}) >= 40


def test_cpu_profile_rejects_multi_process_layout(local_config):
    local_config["models"][0]["tensorParallelSize"] = 2
    with pytest.raises(ConfigError, match=r"models\[0\]\.tensorParallelSize/pipelineParallelSize"):
        parse_stack_config(local_config)


def test_all_problems_reported_at_once(dev_config):
    dev_config["modelRoot"] = "models"
    dev_config["models"][0]["dtype"] = "fp64"
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(dev_config)
    assert len(raised.value.problems) == 2


@pytest.mark.parametrize("case,mutate,key,fix", BAD_CONFIGS[::8], ids=[c[0] for c in BAD_CONFIGS[::8]])
def test_program_creates_nothing_on_bad_config(dev_config, case, mutate, key, fix):
    mutate(dev_config)
    run = run_program(dev_config, stack="dev")
    assert run.error is not None and key in str(run.error)
    assert run.resources == []


def test_stack_files_are_valid():
    for stack in ("dev", "local"):
        parse_stack_config(copy.deepcopy(stack_config(REPO / f"Pulumi.{stack}.yaml")))
