"""The JSON the Pulumi components hand to `node-runtime serve` and `node-runtime gateway`.

These models are the contract of docs/runtime-contract.md: unknown keys are rejected, so a
mistyped key fails at once with its name instead of being silently ignored.
"""

from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSpec(_Strict):
    """The Ray cluster a server needs before it may start (and that /health checks)."""

    ray_address: str = Field(pattern=r"^[^:\s]+:\d{1,5}$", description="HEAD_IP:RAY_PORT")
    expected_nodes: int = Field(ge=1)
    expected_gpus: int = Field(ge=0, description="GPUs in the whole cluster")
    timeout_s: float = Field(gt=0)


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

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class UpstreamServer(_Strict):
    name: str = Field(min_length=1, description="the served model name clients ask for")
    url: AnyHttpUrl


class GatewayConfig(_Strict):
    """What `node-runtime gateway` reads from NODE_RUNTIME_GATEWAY_CONFIG."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    servers: list[UpstreamServer] = Field(min_length=1)
    cluster: ClusterSpec
    max_batch_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(600, gt=0)
    workers: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _unique_names(self) -> "GatewayConfig":
        names = [server.name for server in self.servers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"servers: each name must be unique, repeated: {', '.join(duplicates)}")
        return self


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
