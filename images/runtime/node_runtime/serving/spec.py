"""The JSON the Pulumi components hand to `node-runtime serve` (the gateway's is in serving/gateway/config.py).

These models are the contract of docs/runtime-contract.md: unknown keys are rejected, so a
mistyped key fails at once with its name instead of being silently ignored.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSpec(_Strict):
    """The Ray cluster a server needs before it may start (and that /health checks)."""

    ray_address: str = Field(pattern=r"^[^:\s]+:\d{1,5}$", description="HEAD_IP:RAY_PORT")
    expected_nodes: int = Field(ge=1)
    expected_gpus: int = Field(ge=0, description="GPUs in the whole cluster")
    timeout_s: float = Field(gt=0)


class Slot(_Strict):
    """Where a blue-green copy may run: these devices of its node, this port."""

    devices: list[int]
    port: int = Field(ge=1, le=65535)


class ServeSpec(_Strict):
    """One served model: what `node-runtime serve` reads from NODE_RUNTIME_SERVE_SPEC."""

    served_model_name: str = Field(min_length=1)
    model_path: str = Field(pattern=r"^/", description="absolute path, the same on every node")
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    accelerator: Literal["dcu", "cpu"]
    # The concrete layout the program planned; the launcher checks it against what Ray reports.
    tensor_parallel_size: int = Field(ge=1)
    pipeline_parallel_size: int = Field(ge=1)
    distributed_executor_backend: Literal["ray", "mp"] | None = Field(
        None, description="vLLM's --distributed-executor-backend; null = one process"
    )
    quantization: str = Field("none", min_length=1)
    dtype: str = "auto"
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    extra_args: list[str] = []
    # The Ray cluster to wait for: only a replica on Ray's executor runs on it.
    cluster: ClusterSpec | None = None
    # Blue-green: the two slots a copy may take (the one the running copy does not hold, by a lock in
    # slot_lock_dir); `port` and the devices in view are then the slot's.
    slots: list[Slot] | None = Field(None, min_length=2)
    slot_lock_dir: str | None = Field(None, pattern=r"^/")

    @model_validator(mode="after")
    def _slots_need_a_lock_dir(self) -> "ServeSpec":
        if (self.slots is None) != (self.slot_lock_dir is None):
            raise ValueError("slots and slot_lock_dir: give both (a blue-green copy) or neither")
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per bad field, each naming the field by its dotted path, e.g. `cluster.expected_nodes`."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field (check the spelling against docs/runtime-contract.md)"
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)
