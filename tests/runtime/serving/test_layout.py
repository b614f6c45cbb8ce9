import pytest

from node_runtime.serving.layout import Layout, LayoutError, resolve_layout


@pytest.mark.parametrize(("tp", "pp", "nodes", "per_node", "expected"), [
    (0, 0, 3, 8, Layout(8, 3)),    # auto: a node per stage, the node's GPUs per TP group
    (0, 0, 1, 8, Layout(8, 1)),
    (0, 1, 3, 8, Layout(8, 1)),    # PP pinned
    (4, 0, 3, 8, Layout(4, 1)),    # a TP group smaller than a node: one stage
    (8, 0, 2, 8, Layout(8, 1)),    # TP pinned: one stage, the other node stays free for other models
    (4, 4, 2, 8, Layout(4, 4)),    # 16 GPUs = two whole nodes
    (16, 1, 2, 8, Layout(16, 1)),  # TP across two whole nodes
    (0, 0, 2, 0, Layout(1, 1)),    # CPU: auto means 1
    (2, 0, 1, 0, Layout(2, 1)),
])
def test_resolve_layout(tp, pp, nodes, per_node, expected):
    assert resolve_layout(tp, pp, nodes=nodes, gpus_per_node=per_node) == expected


def test_more_gpus_than_the_cluster_has():
    with pytest.raises(LayoutError, match=r"TP 8 x PP 4 = 32 GPUs, but the cluster has 24"):
        resolve_layout(8, 4, nodes=3, gpus_per_node=8)


def test_layout_that_does_not_fill_whole_nodes():
    with pytest.raises(LayoutError, match=r"does not fill whole nodes of 8 GPUs"):
        resolve_layout(4, 3, nodes=2, gpus_per_node=8)


def test_tp_split_unevenly_across_nodes():
    with pytest.raises(LayoutError, match=r"TP 12 splits"):
        resolve_layout(12, 2, nodes=3, gpus_per_node=8)
