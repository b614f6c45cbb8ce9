"""The plan: every derived value, worked out once from the stack config."""

import pytest

from components.accelerators import PROFILES
from components.config import parse_stack_config
from components.plan import Layout, LayoutError, make_plan, resolve_layout
from components.schema import Model
from tests.support.pulumi_program import REPO, stack_config

DCU, CPU = PROFILES["dcu"], PROFILES["cpu"]


def _model(tp: int, pp: int) -> Model:
    return Model(id="meta-llama/Llama-3.1-8B-Instruct", tensor_parallel_size=tp, pipeline_parallel_size=pp)


@pytest.mark.parametrize(("tp", "pp", "nodes", "per_node", "expected"), [
    (0, 0, 3, 8, Layout(8, 3)),    # auto: a node per stage, the node's GPUs per TP group
    (0, 0, 1, 8, Layout(8, 1)),
    (0, 1, 3, 8, Layout(8, 1)),    # PP pinned
    (4, 0, 3, 8, Layout(4, 1)),    # a TP group smaller than a node: one stage
    (8, 0, 2, 8, Layout(8, 1)),    # TP pinned: one stage, the other node stays free for other models
    (4, 4, 2, 8, Layout(4, 4)),    # 16 GPUs = two whole nodes
    (16, 1, 2, 8, Layout(16, 1)),  # TP across two whole nodes
])
def test_resolve_layout(tp, pp, nodes, per_node, expected):
    assert resolve_layout(_model(tp, pp), profile=DCU, gpus=[per_node] * nodes) == expected


@pytest.mark.parametrize(("tp", "pp"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cpu_serves_in_one_process(tp, pp):
    assert resolve_layout(_model(tp, pp), profile=CPU, gpus=[0, 0]) == Layout(1, 1)


def test_more_gpus_than_the_cluster_has():
    with pytest.raises(LayoutError, match=r"8 x pipelineParallelSize 4 = 32 GPUs, but the cluster has 24"):
        resolve_layout(_model(8, 4), profile=DCU, gpus=[8, 8, 8])


def test_layout_that_does_not_fill_whole_nodes():
    with pytest.raises(LayoutError, match=r"^pipelineParallelSize: 4 x 3 = 12 GPUs spans nodes without filling them"):
        resolve_layout(_model(4, 3), profile=DCU, gpus=[8, 8])


def test_tp_split_unevenly_across_nodes():
    with pytest.raises(LayoutError, match=r"^tensorParallelSize: 12 does not fill whole nodes of 8 GPUs"):
        resolve_layout(_model(12, 2), profile=DCU, gpus=[8, 8, 8])


def test_executor_follows_the_profile_and_the_layout():
    """The one DCU/CPU difference in how a model runs: Ray across DCUs; vLLM's own on CPU (Ray does not support CPU)."""
    assert DCU.executor_for(Layout(8, 3).world_size) == "ray"
    assert DCU.executor_for(Layout(1, 1).world_size) is None   # one process needs no executor across nodes
    assert CPU.executor_for(Layout(2, 1).world_size) is None
    assert CPU.executor_for(Layout(1, 1).world_size) is None


def test_plan_of_the_dev_stack():
    plan = make_plan(parse_stack_config(stack_config(REPO / "Pulumi.dev.yaml")))
    assert [node.label for node in plan.nodes] == ["dcu-head", "dcu-worker-1", "dcu-worker-2"]
    assert str(plan.workers[1].ssh) == "root@10.0.0.13:22" and plan.workers[1].ssh.url == "ssh://root@10.0.0.13:22"
    assert plan.head.nccl_interface == plan.head.gloo_interface == "eth0"
    (model,) = plan.models
    (replica,) = model.replicas
    assert (model.layout, replica.executor, replica.port, replica.host) == (Layout(8, 3), "ray", 8100, "127.0.0.1")
    assert replica.nodes == ("dcu-head", "dcu-worker-1", "dcu-worker-2") and replica.devices == tuple(range(8))
    assert [node.ray_devices for node in plan.nodes] == [tuple(range(8))] * 3  # Ray owns what the spanning replica uses
    assert plan.model_path(model.model) == "/data/models/Llama-3.1-70B-Instruct"
    assert (plan.cluster.expected_nodes, plan.cluster.expected_gpus) == (3, 24)
    assert plan.gateway_url == "http://10.0.0.11:8000" and plan.dashboard_url == "http://10.0.0.11:8265"
    assert (8000, "apiPort") in plan.head.ports and (6379, "rayPorts.gcs") in plan.head.ports
    assert {key for _, key in plan.workers[0].ports} == {
        "rayPorts.objectManager", "rayPorts.nodeManager", "rayPorts.metricsExport", "rayPorts.dashboardAgentGrpc",
        "rayPorts.dashboardAgentListen", "rayPorts.runtimeEnvAgent"}
    assert (29555, "clusterCheckPort") in plan.head.ports
    assert plan.fabric is not None and plan.fabric.nccl and plan.fabric.port == 29555


def test_a_nodes_own_interface_wins_over_the_stacks(dev_config):
    dev_config["workers"][0]["interface"] = "ib0"
    plan = make_plan(parse_stack_config(dev_config))
    assert (plan.workers[0].nccl_interface, plan.workers[0].gloo_interface) == ("ib0", "ib0")
    assert plan.workers[1].nccl_interface == "eth0"
