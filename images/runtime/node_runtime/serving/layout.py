"""How one model is split across the cluster: tensor parallel (TP) x pipeline parallel (PP)."""

from dataclasses import dataclass


class LayoutError(ValueError):
    """The requested TP/PP cannot run on this cluster; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    tensor_parallel_size: int
    pipeline_parallel_size: int

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def resolve_layout(tensor_parallel_size: int, pipeline_parallel_size: int, *, nodes: int, gpus_per_node: int) -> Layout:
    """Turn the spec's TP/PP (0 = auto) into concrete sizes that fit the cluster.

    Auto follows vLLM's multi-node advice: TP = the GPUs of one node and one pipeline stage per
    node. A pinned TP keeps PP 1 unless PP is pinned too, so a model given a TP of its own leaves
    the other nodes to other models (the same rule as the program's components/config.py).
    Without GPUs (CPU profile) auto means 1 and the sizes are vLLM's business.
    """
    if gpus_per_node == 0:
        return Layout(tensor_parallel_size or 1, pipeline_parallel_size or 1)

    tp = tensor_parallel_size or gpus_per_node
    pp = pipeline_parallel_size or (nodes if tensor_parallel_size == 0 else 1)
    layout = Layout(tp, pp)
    total = nodes * gpus_per_node
    how_to_fix = (
        "lower tensorParallelSize/pipelineParallelSize (0 = auto) or add GPUs/nodes "
        f"(cluster: {nodes} node(s) x {gpus_per_node} GPUs)"
    )
    if layout.world_size > total:
        raise LayoutError(f"TP {tp} x PP {pp} = {layout.world_size} GPUs, but the cluster has {total}: {how_to_fix}")
    if layout.world_size > gpus_per_node and layout.world_size % gpus_per_node:
        raise LayoutError(
            f"TP {tp} x PP {pp} = {layout.world_size} GPUs spans several nodes but does not fill whole nodes "
            f"of {gpus_per_node} GPUs: use a multiple of {gpus_per_node}, or at most {gpus_per_node} for one node"
        )
    if tp > gpus_per_node and tp % gpus_per_node:
        raise LayoutError(
            f"TP {tp} splits a tensor-parallel group across nodes unevenly: use a TP that divides or is a "
            f"multiple of {gpus_per_node} (the GPUs per node), and PP for the rest"
        )
    return layout
