"""The real program under Pulumi's mocks, for every stack file: resources, inputs, edges, outputs."""

import json

import pytest

from components.config import parse_stack_config
from components.plan import make_plan
from components.specs import gateway_config
from tests.support.pulumi_program import REPO, ProgramRun, run_program, stack_config
from tests.unit.conftest import STACK_FILES
from tests.unit.test_placement import _stack

CONTAINER = "docker:index/container:Container"
REMOTE = "command:remote:Command"


def env_of(resource) -> dict[str, str]:
    return dict(item.split("=", 1) for item in resource.inputs["envs"])


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    run = run_program(stack_config(REPO / "Pulumi.dev.yaml"), stack="dev",
                      secrets={"sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nkey\n", "apiKey": "sk-test-key",
                               "hfToken": "hf_secret_token"})
    assert run.error is None, run.error
    return run


@pytest.fixture(scope="module")
def local() -> ProgramRun:
    run = run_program(stack_config(REPO / "Pulumi.local.yaml"), stack="local")
    assert run.error is None, run.error
    return run


@pytest.mark.parametrize("stack_file", STACK_FILES, ids=[p.name for p in STACK_FILES])
def test_every_stack_file_runs(stack_file):
    run = run_program(stack_config(stack_file), stack=stack_file.stem.split(".")[1])
    assert run.error is None, run.error
    assert {"gatewayUrl", "rayDashboardUrl", "imageIds", "nodes", "models"} <= set(run.outputs)


def test_component_type_tokens(dev):
    types = {r.type for r in dev.resources}
    for component in ("Deployment", "Host", "NodeImage", "RayHead", "RayWorker", "ModelStore", "ModelServer", "Gateway"):
        assert f"vllm-dcu:index:{component}" in types


def test_children_are_named_after_their_component(dev):
    for resource in dev.resources:
        if resource.parent and "vllm-dcu:index:" in resource.parent:
            parent = dev.by_urn(resource.parent)
            assert resource.name.startswith(parent.name), (resource.name, parent.name)


def test_dcu_ray_containers_carry_the_dcu_profile(dev):
    containers = [r for r in dev.of_type(CONTAINER) if "-ray-" in r.name]
    assert len(containers) == 3
    for c in containers:
        inputs = c.inputs
        # /dev/mkfd only where the host has it (test_dcu_settings.py); these mock hosts report none.
        assert {d["hostPath"] for d in inputs["devices"]} == {"/dev/kfd", "/dev/dri"}
        assert inputs["groupAdds"] == ["video"]
        assert inputs["capabilities"]["adds"] == ["SYS_PTRACE"]
        assert inputs["securityOpts"] == ["seccomp=unconfined"]
        assert inputs["ipcMode"] == "host" and inputs["networkMode"] == "host"
        assert inputs["shmSize"] == 64 * 1024
        assert inputs["restart"] == "unless-stopped"
        mounts = {(m["source"], m["target"], m.get("readOnly", False)) for m in inputs["mounts"]}
        assert ("/data/models", "/data/models", False) in mounts  # same absolute path everywhere
        assert ("/opt/hyhal", "/opt/hyhal", True) in mounts
        env = env_of(c)
        assert env["HIP_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        assert "ROCR_VISIBLE_DEVICES" not in env
        assert env["RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES"] == "1"
        assert env["RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES"] == "1"
        assert env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1" and "CUDA_VISIBLE_DEVICES" not in env
        assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert "--num-gpus=8" in inputs["command"] and "--block" in inputs["command"]


def test_every_node_advertises_its_own_address(dev):
    for c in (r for r in dev.of_type(CONTAINER) if "-ray-" in r.name):
        env = env_of(c)
        address = env["VLLM_HOST_IP"]
        assert f"--node-ip-address={address}" in c.inputs["command"]
    head = dev.named("vllm-ray-head-container")
    assert env_of(head)["VLLM_HOST_IP"] == "10.0.0.11"
    assert head.inputs["command"][:4] == ["ray", "start", "--head", "--port=6379"]
    worker = dev.named("vllm-ray-dcu-worker-2-container")
    assert env_of(worker)["VLLM_HOST_IP"] == "10.0.0.13"
    assert "--address=10.0.0.11:6379" in worker.inputs["command"]


def test_containers_run_the_image_id_of_their_own_host(dev):
    ids = dev.outputs["imageIds"]
    assert len(set(ids.values())) == 1 and set(ids) == {"dcu-head", "dcu-worker-1", "dcu-worker-2"}
    for c in dev.of_type(CONTAINER):
        if c.name != "vllm-image-relay":  # the relay serves the image it runs from (tests/unit/test_node_image.py)
            assert c.inputs["image"] == ids["dcu-head"]


def test_each_container_goes_to_its_own_host_provider(dev):
    worker = dev.named("vllm-ray-dcu-worker-1-container")
    assert worker.provider.startswith(dev.named("vllm-dcu-worker-1-docker").urn)
    provider = dev.named("vllm-dcu-worker-1-docker")
    assert provider.inputs["host"] == "ssh://root@10.0.0.12:22"


def test_ordering_is_by_data(dev):
    head = dev.named("vllm-ray-head-container")
    ready = dev.named("vllm-ray-ready")
    server = dev.named("vllm-server-Llama-3.1-70B-Instruct-0-container")
    healthy = dev.named("vllm-server-Llama-3.1-70B-Instruct-0-healthy")
    routed = dev.named("vllm-server-Llama-3.1-70B-Instruct-0-routed")
    gateway = dev.named("vllm-gateway-container")
    for worker in ("vllm-ray-dcu-worker-1-container", "vllm-ray-dcu-worker-2-container"):
        assert dev.depends_on(dev.named(worker), head)
        assert dev.depends_on(ready, dev.named(worker))
    assert dev.depends_on(server, ready)
    for node in ("dcu-head", "dcu-worker-1", "dcu-worker-2"):
        verify = dev.named(f"vllm-model-Llama-3.1-70B-Instruct-{node}-verify")
        assert dev.depends_on(server, verify)
    assert dev.depends_on(dev.named("vllm-model-Llama-3.1-70B-Instruct-dcu-worker-2-verify"),
                          dev.named("vllm-model-Llama-3.1-70B-Instruct-sync"))
    assert dev.depends_on(routed, healthy) and dev.depends_on(gateway, routed)
    assert not dev.depends_on(head, server)


def test_cluster_readiness_waits_for_every_node_and_gpu(dev):
    script = dev.named("vllm-ray-ready").inputs["create"]
    assert "node-runtime cluster wait --address 10.0.0.11:6379 --nodes 3 --gpus 24" in script


def test_preflight_checks_devices_disk_and_ports(dev):
    script = dev.named("vllm-dcu-head-preflight").inputs["create"]
    for expected in ("docker info", "/dev/kfd", "/dev/dri/renderD*", "-ge 8", "/opt/hyhal", "/sys/module/hydcu/version",
                     "df -Pk /data/models", "sport = :6379", "sport = :8000", "sport = :29555", "-ge 200"):
        assert expected in script, expected
    # Only some drivers create /dev/mkfd: the facts report it, the preflight does not require it.
    assert "/dev/mkfd" not in script and "/dev/mkfd" in dev.named("vllm-dcu-head-facts").inputs["create"]
    # A replica's port is its launcher's to check: adding a replica touches no host.
    assert "sport = :8100" not in script
    for container in dev.of_type(CONTAINER):
        host_label = "dcu-head" if "worker" not in container.name else container.name.split("vllm-ray-")[1].rsplit("-container")[0]
        assert dev.depends_on(container, dev.named(f"vllm-{host_label}-preflight"))


def test_model_store_commands(dev):
    download = dev.named("vllm-model-Llama-3.1-70B-Instruct-download")
    create = download.inputs["create"]
    assert "node-runtime model download --source huggingface --repo-id meta-llama/Llama-3.1-70B-Instruct" in create
    assert "--revision 1605565b47bb9346c5515c34102e054115b4f98b" in create
    assert "hf_secret_token" not in create and download.inputs["stdin"] == "hf_secret_token"
    assert "stdin" in download.secret_paths
    sync = dev.named("vllm-model-Llama-3.1-70B-Instruct-sync").inputs["create"]
    assert "--node root@10.0.0.12:22 --node root@10.0.0.13:22" in sync
    assert "--identity /data/vllm-dcu/ssh/relay_ed25519" in sync
    for command in dev.of_type(REMOTE):
        if "-model-" in command.name:
            assert not command.inputs.get("delete"), "model files must outlive the stack"


def test_server_spec_and_gateway_config(dev):
    server = dev.named("vllm-server-Llama-3.1-70B-Instruct-0-container")
    assert server.inputs["command"] == ["node-runtime", "serve"]
    assert server.inputs["name"] == "vllm-server-Llama-3.1-70B-Instruct-0"
    spec = json.loads(env_of(server)["NODE_RUNTIME_SERVE_SPEC"])
    assert spec["model_path"] == "/data/models/Llama-3.1-70B-Instruct"
    assert spec["host"] == "127.0.0.1" and spec["port"] == 8100
    assert spec["cluster"] == {"ray_address": "10.0.0.11:6379", "expected_nodes": 3, "expected_gpus": 24, "timeout_s": 900}
    # The concrete layout (tensorParallelSize 0 = auto), as the outputs show it.
    assert (spec["tensor_parallel_size"], spec["pipeline_parallel_size"]) == (8, 3)
    assert spec["distributed_executor_backend"] == "ray"
    gateway = dev.named("vllm-gateway-container")
    config = json.loads(env_of(gateway)["NODE_RUNTIME_GATEWAY_CONFIG"])
    assert config["models"] == ["Llama-3.1-70B-Instruct"]
    assert config["routes_dir"] == "/data/vllm-dcu/gateway/routes"
    assert config["port"] == 8000 and config["workers"] == 4
    assert "speed_aware_models" not in config, "balancing: leastOutstanding unless a model says speedAware"
    route = dev.named("vllm-server-Llama-3.1-70B-Instruct-0-routed")
    assert route.inputs["connection"]["host"] == "10.0.0.11"
    assert '"url": "http://127.0.0.1:8100"' in route.inputs["create"]
    assert "/data/vllm-dcu/gateway/routes/Llama-3.1-70B-Instruct-0.json" in route.inputs["create"]
    assert "node-runtime gateway drain --replica Llama-3.1-70B-Instruct/0" in route.inputs["delete"]


def test_secrets_stay_secret(dev):
    gateway = dev.named("vllm-gateway-container")
    assert "NODE_RUNTIME_API_KEY=sk-test-key" in gateway.inputs["envs"]
    assert "envs" in gateway.secret_paths
    # The replicas' internal key: made on the head, a secret output never logged, in env only.
    key = dev.named("vllm-dcu-head-internal-key")
    assert key.inputs["logging"] == "none"
    internal = [e for e in gateway.inputs["envs"] if e.startswith("NODE_RUNTIME_INTERNAL_KEY=")]
    server = dev.named("vllm-server-Llama-3.1-70B-Instruct-0-container")
    assert len(internal) == 1 and "envs" in server.secret_paths
    assert any(e.startswith("VLLM_API_KEY=") for e in server.inputs["envs"])
    for resource in dev.resources:
        for key in ("create", "command"):
            assert "sk-test-key" not in json.dumps(resource.inputs.get(key, ""))
            assert "hf_secret_token" not in json.dumps(resource.inputs.get(key, ""))
    assert "sk-test-key" not in json.dumps(dev.outputs) and "PRIVATE KEY" not in json.dumps(dev.outputs)


def test_outputs(dev):
    assert dev.outputs["gatewayUrl"] == "http://10.0.0.11:8000"
    assert dev.outputs["rayDashboardUrl"] == "http://10.0.0.11:8265"
    assert [n["address"] for n in dev.outputs["nodes"]] == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    assert dev.outputs["models"][0]["tensorParallelSize"] == 8
    assert dev.outputs["models"][0]["pipelineParallelSize"] == 3


def test_local_stack_uses_the_local_socket_and_cpu(local):
    provider = local.named("vllm-local-docker")
    assert provider.inputs["host"] == "unix:///var/run/docker.sock"
    assert not local.of_type(REMOTE)
    head = local.named("vllm-ray-head-container")
    assert "devices" not in head.inputs or not head.inputs["devices"]
    assert "HIP_VISIBLE_DEVICES" not in env_of(head)
    assert "--num-gpus=0" in head.inputs["command"]
    assert "-sync" not in " ".join(r.name for r in local.resources)


def _signature(run: ProgramRun) -> dict[str, str]:
    return {r.name: json.dumps(r.inputs, sort_keys=True) for r in run.resources}


def test_changing_one_models_tp_replaces_only_that_models_server():
    base = stack_config(REPO / "Pulumi.dev.yaml")
    base["models"][0].update(tensorParallelSize=8, pipelineParallelSize=1)
    base["models"].append({"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 4})
    changed = json.loads(json.dumps(base))
    changed["models"][1]["tensorParallelSize"] = 8
    before, after = run_program(base, stack="dev"), run_program(changed, stack="dev")
    assert before.error is None and after.error is None
    a, b = _signature(before), _signature(after)
    assert set(a) == set(b)
    differing = {name for name in a if a[name] != b[name]}
    assert differing == {"vllm-server-Qwen2.5-7B-Instruct-0-container"}


def test_adding_a_worker_leaves_existing_workers_alone():
    base = stack_config(REPO / "Pulumi.dev.yaml")
    base["models"][0].update(tensorParallelSize=8, pipelineParallelSize=1)
    grown = json.loads(json.dumps(base))
    grown["workers"].append({"address": "10.0.0.14", "name": "dcu-worker-3", "gpus": 8})
    a, b = _signature(run_program(base, stack="dev")), _signature(run_program(grown, stack="dev"))
    assert a["vllm-ray-dcu-worker-1-container"] == b["vllm-ray-dcu-worker-1-container"]
    assert a["vllm-ray-head-container"] == b["vllm-ray-head-container"]
    assert "vllm-ray-dcu-worker-3-container" in b


def test_gateway_shares_the_heads_ray_session_directory(dev):
    gateway = dev.named("vllm-gateway-container")
    mounts = {(m["source"], m["target"], m.get("readOnly", False)) for m in gateway.inputs["mounts"]}
    assert mounts == {("/data/vllm-dcu/ray", "/data/vllm-dcu/ray", False),
                      ("/data/vllm-dcu/gateway/routes", "/data/vllm-dcu/gateway/routes", True)}
    assert "devices" not in gateway.inputs or not gateway.inputs["devices"]


def test_model_sync_waits_for_the_image_on_every_worker(dev):
    sync = dev.named("vllm-model-Llama-3.1-70B-Instruct-sync")
    for worker in ("dcu-worker-1", "dcu-worker-2"):
        assert dev.depends_on(sync, dev.named(f"vllm-image-{worker}-id"))


def test_preflight_makes_every_bind_mount_source(dev):
    for host in ("dcu-head", "dcu-worker-1"):
        script = dev.named(f"vllm-{host}-preflight").inputs["create"]
        assert "mkdir -p /data/models /data/vllm-dcu/ray" in script


def test_a_model_set_to_speed_aware_balancing_tells_the_gateway_and_only_that_model():
    plan = make_plan(parse_stack_config(_stack([8, 8], [{"tensorParallelSize": 4, "replicas": 2, "balancing": "speedAware"},
                                                        {"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 4}])))
    config = gateway_config(plan)
    assert len(config["models"]) == 2 and config["speed_aware_models"] == [config["models"][0]]
