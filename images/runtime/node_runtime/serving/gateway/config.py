"""The gateway's side of docs/runtime-contract.md: its static config, and the route files that
declare the replicas (read while it runs, so replicas change without a restart).

Unknown keys are rejected, so a mistyped key fails at once with its name.
"""

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from node_runtime.serving.spec import ClusterSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayConfig(_Strict):
    """What `node-runtime gateway` reads from NODE_RUNTIME_GATEWAY_CONFIG; a change restarts the gateway."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    models: list[str] = Field(min_length=1, description="the served names clients ask for, in config order")
    routes_dir: str = Field(pattern=r"^/", description="absolute; one route file per replica, watched")
    cluster: ClusterSpec
    max_batch_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(600, gt=0, description="per request to a replica")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[str]) -> list[str]:
        if any(not name for name in models):
            raise ValueError("a served name cannot be empty")
        repeated = sorted({name for name in models if models.count(name) > 1})
        if repeated:
            raise ValueError(f"each name must be unique, repeated: {', '.join(repeated)}")
        return models


class RouteFile(_Strict):
    """One replica, as the program declares it in `<routes_dir>/<name>.json`."""

    model: str = Field(min_length=1, description="a served name of the config's `models`")
    replica: str = Field(min_length=1, max_length=200, description="unique; the `replica` label of /metrics")
    url: AnyHttpUrl
    node: str = Field(min_length=1, description="the node it runs on, for /health and /")

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")
