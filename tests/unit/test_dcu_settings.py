"""Issue 11 under Pulumi's mocks: vendor settings, device visibility, network identity, the fabric check,
Ray's pinned ports and the dashboard's bind, quantization per profile — as the declared resources carry them."""

from __future__ import annotations

import copy
import json

import pytest

from components.checks import stack_warnings
from components.config import ConfigError, parse_stack_config
from components.plan import make_plan
from components.preflight import HostFacts
from components.specs import node_container_spec, ray_start_command
from tests.support.pulumi_program import REPO, ProgramMocks, ProgramRun, run_program, stack_config
from tests.unit.test_program import CONTAINER, env_of

DEV = stack_config(REPO / "Pulumi.dev.yaml")
SUMMARY = {"ok": True, "backends": ["gloo", "nccl"], "port": 29555, "seconds": 4.2, "nodes": [
    {"address": address, "head": address == "10.0.0.11", "gpus": 8.0, "python": "3.10.12", "ray": "2.43.0",
     "vllm": "0.9.2", "torch": "2.4.1", "gloo_interface": "eth0", "gloo_address": address,
     "nccl_interface": "eth0", "ok": True, "problem": None}
    for address in ("10.0.0.11", "10.0.0.12", "10.0.0.13")]}


class HostMocks(ProgramMocks):
    """Hosts that answer the facts script as `facts[label]` says, and a fabric check that passed."""

    def __init__(self, facts: dict[str, HostFacts]):
        self.facts = facts

    def new_resource(self, args):
        resource_id, state = super().new_resource(args)
        for label, facts in self.facts.items():
            if args.name == f"vllm-{label}-facts":
                lines = [f"device={d}" for d in facts.devices] + [f"interface={facts.interface}"] * bool(facts.interface)
                state["stdout"] = "\n".join(lines + [f"driver={facts.driver}"] * bool(facts.driver)) + "\n"
        if args.name == "vllm-ray-checked":
            state["stdout"] = "checking 3 nodes\n" + json.dumps(SUMMARY) + "\n"
        return resource_id, state


def _run(config: dict, facts: dict[str, HostFacts] | None = None) -> ProgramRun:
    run = run_program(config, stack="dev", mocks=HostMocks(facts or {}))
    assert run.error is None, run.error
    return run


def _dev(**changes) -> dict:
    config = copy.deepcopy(DEV)
    config.update(changes)
    return config


def _devices(resource) -> set[str]:
    return {d["hostPath"] for d in resource.inputs.get("devices") or []}


def _node_containers(run: ProgramRun):
    return [r for r in run.of_type(CONTAINER) if "-ray-" in r.name or "-server-" in r.name]


# --- 1. vendor settings on every node container ----------------------------------------------------


def test_vendor_settings_reach_every_node_container_and_not_the_gateway():
    workers = copy.deepcopy(DEV["workers"])
    workers[1]["extraEnv"] = {"NCCL_IB_HCA": "mlx5_2:1", "VLLM_HCU_USE_CUSTOM_OPS": "0"}
    run = _run(_dev(workers=workers, extraEnv={"NCCL_IB_HCA": "mlx5_0:1,mlx5_1:1", "NCCL_MIN_NCHANNELS": 16},
                    extraDevices=["/dev/infiniband"], ulimits={"memlock": -1, "stack": "67108864:-1"}, privileged=True))
    containers = _node_containers(run)
    assert len(containers) == 4
    for container in containers:
        env = env_of(container)
        worker_2 = "dcu-worker-2" in container.name
        assert env["NCCL_IB_HCA"] == ("mlx5_2:1" if worker_2 else "mlx5_0:1,mlx5_1:1")
        assert env["NCCL_MIN_NCHANNELS"] == "16"
        assert ("VLLM_HCU_USE_CUSTOM_OPS" in env) == worker_2
        assert "/dev/infiniband" in _devices(container)
        assert container.inputs["ulimits"] == [{"name": "memlock", "soft": -1, "hard": -1},
                                               {"name": "stack", "soft": 67108864, "hard": -1}]
        assert container.inputs["privileged"] is True
    gateway = run.named("vllm-gateway-container")
    assert "NCCL_IB_HCA" not in json.dumps(gateway.inputs["envs"]) and not gateway.inputs.get("privileged")
    assert not gateway.inputs.get("ulimits") and not _devices(gateway)


def test_without_vendor_settings_no_container_is_privileged():
    run = _run(_dev())
    for container in run.of_type(CONTAINER):
        assert not container.inputs.get("privileged") and not container.inputs.get("ulimits")


# --- 3. device visibility ---------------------------------------------------------------------------


def test_each_container_sees_exactly_the_devices_it_owns():
    """A 2-node TP8 x PP2 replica (Ray owns those devices on its nodes) and two TP4 replicas on the third node."""
    models = [{"id": "meta-llama/Llama-3.1-70B-Instruct", "tensorParallelSize": 8, "pipelineParallelSize": 2},
              {"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 4, "replicas": 2}]
    run = _run(_dev(models=models))
    visible = {r.name: env_of(r)["HIP_VISIBLE_DEVICES"] for r in _node_containers(run)}
    assert visible == {
        "vllm-ray-head-container": "0,1,2,3,4,5,6,7",
        "vllm-ray-dcu-worker-1-container": "0,1,2,3,4,5,6,7",
        "vllm-ray-dcu-worker-2-container": "",  # Ray owns no device there: the replicas do
        "vllm-server-Llama-3.1-70B-Instruct-0-container": "0,1,2,3,4,5,6,7",
        "vllm-server-Qwen2.5-7B-Instruct-0-container": "0,1,2,3",
        "vllm-server-Qwen2.5-7B-Instruct-1-container": "4,5,6,7",
    }
    assert "--num-gpus=0" in run.named("vllm-ray-dcu-worker-2-container").inputs["command"]
    for container in _node_containers(run):
        env = env_of(container)
        assert {name: env[name] for name in env if name.startswith("RAY_EXPERIMENTAL_NOSET_")} == {
            f"RAY_EXPERIMENTAL_NOSET_{kind}_VISIBLE_DEVICES": "1" for kind in ("HIP", "ROCR", "CUDA")}
        assert "CUDA_VISIBLE_DEVICES" not in env and "ROCR_VISIBLE_DEVICES" not in env


def test_mkfd_only_where_the_host_has_it():
    run = _run(_dev(), {"dcu-worker-1": HostFacts(devices=("/dev/mkfd",), driver="6.3.8-V1.5.2")})
    assert [node["driver"] for node in run.outputs["nodes"]] == [None, "6.3.8-V1.5.2", None]
    assert "/dev/mkfd" in _devices(run.named("vllm-ray-dcu-worker-1-container"))
    for name in ("vllm-ray-head-container", "vllm-ray-dcu-worker-2-container", "vllm-server-Llama-3.1-70B-Instruct-0-container"):
        assert _devices(run.named(name)) == {"/dev/kfd", "/dev/dri"}


# --- 4. network identity ----------------------------------------------------------------------------


def _with_cluster_addresses() -> dict:
    config = _dev(models=[{"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 8, "replicas": 3}])
    config["head"] = {**config["head"], "clusterAddress": "192.168.50.11"}
    config["workers"] = [{**w, "clusterAddress": f"192.168.50.{12 + i}"} for i, w in enumerate(config["workers"])]
    return config


def test_ray_vllm_and_replicas_use_the_cluster_address_ssh_the_other():
    run = _run(_with_cluster_addresses())
    head, worker = run.named("vllm-ray-head-container"), run.named("vllm-ray-dcu-worker-1-container")
    assert "--node-ip-address=192.168.50.11" in head.inputs["command"]
    assert "--dashboard-host=192.168.50.11" in head.inputs["command"]
    assert "--address=192.168.50.11:6379" in worker.inputs["command"]
    assert "--node-ip-address=192.168.50.12" in worker.inputs["command"]
    for name in ("VLLM_HOST_IP", "RAY_NODE_IP_ADDRESS", "RAY_OVERRIDE_NODE_IP_ADDRESS"):
        assert env_of(worker)[name] == "192.168.50.12"
        assert env_of(run.named("vllm-server-Qwen2.5-7B-Instruct-1-container"))[name] == "192.168.50.12"
    assert run.outputs["plan"]["Qwen2.5-7B-Instruct"][1]["url"] == "http://192.168.50.12:8100"
    assert run.named("vllm-dcu-worker-1-docker").inputs["host"] == "ssh://root@10.0.0.12:22"
    assert run.outputs["gatewayUrl"] == "http://10.0.0.11:8000"
    assert run.outputs["rayDashboardUrl"] == "http://192.168.50.11:8265"
    assert "--address 192.168.50.11:6379" in run.named("vllm-ray-checked").inputs["create"]
    assert [n["clusterAddress"] for n in run.outputs["nodes"]] == ["192.168.50.11", "192.168.50.12", "192.168.50.13"]


def test_an_interface_not_configured_is_the_one_holding_the_cluster_address():
    config = {k: v for k, v in DEV.items() if k not in ("ncclSocketIfname", "glooSocketIfname")}
    run = _run(config, {"dcu-head": HostFacts(interface="ens61f0np0"), "dcu-worker-1": HostFacts(interface="ib0")})
    head, worker = env_of(run.named("vllm-ray-head-container")), env_of(run.named("vllm-ray-dcu-worker-1-container"))
    assert (head["NCCL_SOCKET_IFNAME"], head["GLOO_SOCKET_IFNAME"]) == ("ens61f0np0", "ens61f0np0")
    assert (worker["NCCL_SOCKET_IFNAME"], worker["GLOO_SOCKET_IFNAME"]) == ("ib0", "ib0")
    assert env_of(run.named("vllm-server-Llama-3.1-70B-Instruct-0-container"))["GLOO_SOCKET_IFNAME"] == "ens61f0np0"
    # The preflight refuses a host where none holds it, so a container is never declared without one.
    assert "no interface holds it" in run.named("vllm-dcu-worker-2-preflight").inputs["create"]


def test_one_node_leaves_interfaces_to_the_libraries():
    local = run_program(stack_config(REPO / "Pulumi.local.yaml"), stack="local")
    assert local.error is None
    env = env_of(local.named("vllm-ray-head-container"))
    assert "GLOO_SOCKET_IFNAME" not in env and "NCCL_SOCKET_IFNAME" not in env


# --- 6. the fabric and version check ----------------------------------------------------------------


def test_the_fabric_check_runs_after_ready_and_every_server_waits_for_it():
    run = _run(_dev(models=[{"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 8, "replicas": 3}]))
    checked, ready = run.named("vllm-ray-checked"), run.named("vllm-ray-ready")
    assert checked.inputs["create"] == ("docker exec vllm-ray-head node-runtime cluster check --address 10.0.0.11:6379 "
                                        "--nodes 3 --port 29555 --timeout 180")
    assert checked.inputs["connection"]["host"] == "10.0.0.11"
    assert run.depends_on(checked, ready)
    for index in range(3):
        server = run.named(f"vllm-server-Qwen2.5-7B-Instruct-{index}-container")
        assert run.depends_on(server, checked)
    # Rerun whenever a Ray container is replaced (a new image, a changed setting).
    assert sorted(checked.inputs["triggers"]) == sorted(f"{r.name}-id" for r in run.of_type(CONTAINER) if "-ray-" in r.name)


def test_nccl_is_checked_where_ray_owns_gpus_and_versions_are_an_output():
    run = _run(_dev())
    assert run.named("vllm-ray-checked").inputs["create"].endswith("--timeout 180 --nccl")
    assert run.outputs["versions"] == {
        label: {"python": "3.10.12", "ray": "2.43.0", "vllm": "0.9.2", "torch": "2.4.1"}
        for label in ("dcu-head", "dcu-worker-1", "dcu-worker-2")}
    single = _run(_dev(workers=[], models=[{"id": "Qwen/Qwen2.5-7B-Instruct", "tensorParallelSize": 8}]))
    assert not [r for r in single.resources if r.name == "vllm-ray-checked"]  # one node: no fabric to check
    assert single.depends_on(single.named("vllm-server-Qwen2.5-7B-Instruct-0-container"), single.named("vllm-ray-ready"))
    assert single.outputs["versions"] == {} and "sport = :29555" not in single.named("vllm-dcu-head-preflight").inputs["create"]


# --- 7. Ray's attack surface ------------------------------------------------------------------------


def test_every_ray_port_is_pinned_and_checked():
    plan = make_plan(parse_stack_config(copy.deepcopy(DEV)))
    head, worker = ray_start_command(plan, plan.head), ray_start_command(plan, plan.workers[0])
    for flag in ("--dashboard-agent-grpc-port=8091", "--dashboard-agent-listen-port=52365",
                 "--runtime-env-agent-port=8092", "--object-manager-port=8076", "--node-manager-port=8077",
                 "--metrics-export-port=8090", "--min-worker-port=10002", "--max-worker-port=19999"):
        assert flag in head and flag in worker
    assert "--dashboard-host=10.0.0.11" in head and not any("0.0.0.0" in arg for arg in head)
    assert {port for port, _ in plan.workers[0].ports} == {8076, 8077, 8090, 8091, 52365, 8092}


# --- 2. quantization as the profile serves it ------------------------------------------------------


@pytest.mark.parametrize("method", ["slimquant_marlin", "slimquant_w4a8", "slimquant_w4a8_marlin",
                                    "slimquant_compressed_tensors_marlin", "awq", "int8"])
def test_dcu_accepts_hygons_methods(method):
    config = _dev()
    config["models"][0]["quantization"] = method
    parse_stack_config(config)


@pytest.mark.parametrize("method", ["bitsandbytes", "moe_wna16", "experts_int8", "int3"])
def test_dcu_refuses_what_its_images_do_not_serve_listing_what_they_do(method):
    config = _dev()
    config["models"][0]["quantization"] = method
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(config)
    message = str(raised.value)
    assert f"vllm-dcu:models[0].quantization: '{method}' is not served on the dcu profile; use one of none, int8, " \
           "int4, awq, gptq, fp8" in message
    assert "slimquant_marlin" in message


def test_cpu_keeps_its_own_methods_and_refuses_hygons():
    config = stack_config(REPO / "Pulumi.local.yaml")
    config["models"][0]["quantization"] = "bitsandbytes"
    parse_stack_config(copy.deepcopy(config))
    config["models"][0]["quantization"] = "slimquant_marlin"
    with pytest.raises(ConfigError, match="not served on the cpu profile"):
        parse_stack_config(config)


# --- 5. mountDtk ------------------------------------------------------------------------------------


def test_mount_dtk_warns_that_it_hides_the_images_dtk():
    assert stack_warnings(parse_stack_config(_dev())) == []
    (warning,) = stack_warnings(parse_stack_config(_dev(mountDtk=True)))
    assert warning.startswith("mountDtk: the vendor's vLLM images ship their own DTK at /opt/dtk")
    plan = make_plan(parse_stack_config(_dev(mountDtk=True)))
    spec = node_container_spec(plan, plan.head, "ray-head", [], ())
    assert ("/opt/dtk", True) in spec.bind_mounts and spec.envs["ROCM_PATH"] == "/opt/dtk"


def test_extra_env_is_refused_for_every_variable_the_program_sets():
    """managed_env is the one list extraEnv is checked against: it must hold every variable a node container gets."""
    from components.accelerators import PROFILES
    from components.specs import managed_env

    for config in (_dev(mountDtk=True), _with_cluster_addresses(), stack_config(REPO / "Pulumi.local.yaml")):
        run = run_program(config, stack="dev", mocks=HostMocks({"dcu-head": HostFacts(interface="eth0")}))
        managed = managed_env(PROFILES[config.get("accelerator", "dcu")])
        for container in _node_containers(run):
            assert set(env_of(container)) <= set(managed), container.name
