"""The gateway's side of docs/runtime-contract.md: its static config, and the route files that
declare the replicas (read while it runs, so replicas change without a restart).

Unknown keys are rejected, so a mistyped key fails at once with its name.
"""

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

from node_runtime.serving.spec import ClusterSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A key's name: a /metrics label and a word in the access log, never a secret.
KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Names the gateway gives itself: requests without a key, and the single NODE_RUNTIME_API_KEY.
NO_KEY, SINGLE_KEY = "none", "default"


class KeyPolicy(_Strict):
    """What one named API key may do; its secret value comes from NODE_RUNTIME_API_KEYS, by name."""

    name: str = Field(pattern=KEY_NAME)
    models: list[str] | None = Field(None, min_length=1, description="served names it may use; None: every one")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in (NO_KEY, SINGLE_KEY):
            raise ValueError(f"{name!r} is reserved (requests without a key, the single api key)")
        return name


class GatewayConfig(_Strict):
    """What `node-runtime gateway` reads from NODE_RUNTIME_GATEWAY_CONFIG; a change restarts the gateway."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    models: list[str] = Field(min_length=1, description="the served names clients ask for, in config order")
    speed_aware_models: list[str] = Field([], description="those whose pick also weighs each replica's speed")
    routes_dir: str = Field(pattern=r"^/", description="absolute; one route file per replica, watched")
    cluster: ClusterSpec
    max_batch_size: int = Field(64, ge=1)
    max_n: int = Field(16, ge=1, description="most sequences (`n`) one prompt may ask for")
    max_batch_tokens: int = Field(262144, ge=1, description="prompts x n x max_tokens of one /batch_generate")
    request_timeout_s: float = Field(600, gt=0, description="per request to a replica")
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_header_bytes: int = Field(64 * 2**10, ge=1024, description="the request line and every header together")
    body_read_timeout_s: float = Field(30, gt=0, description="for a request's whole body, once its head is in")
    access_log_percent: int = Field(0, ge=0, le=100, description="of requests logged as JSON lines; 0: none")
    api_keys: list[KeyPolicy] = Field([], description="named keys; their secrets from NODE_RUNTIME_API_KEYS")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[str]) -> list[str]:
        if any(not name for name in models):
            raise ValueError("a served name cannot be empty")
        repeated = sorted({name for name in models if models.count(name) > 1})
        if repeated:
            raise ValueError(f"each name must be unique, repeated: {', '.join(repeated)}")
        return models

    @model_validator(mode="after")
    def _keys_name_served_models(self) -> "GatewayConfig":
        if unknown := [model for model in self.speed_aware_models if model not in self.models]:
            raise ValueError(f"speed_aware_models: {', '.join(unknown)} not among models ({', '.join(self.models)})")
        names = [key.name for key in self.api_keys]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"api_keys: each name must be unique, repeated: {', '.join(repeated)}")
        for i, key in enumerate(self.api_keys):
            unknown = [model for model in key.models or [] if model not in self.models]
            if unknown:
                raise ValueError(f"api_keys[{i}].models: {', '.join(unknown)} not among models ({', '.join(self.models)})")
        return self


class RouteFile(_Strict):
    """One replica, as the program declares it in `<routes_dir>/<name>.json`."""

    model: str = Field(min_length=1, description="a served name of the config's `models`")
    replica: str = Field(min_length=1, max_length=200, description="unique; the `replica` label of /metrics")
    url: AnyHttpUrl
    node: str = Field(min_length=1, description="the node it runs on, for /health and /")

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")
