"""The stack file's schema: every key's type, default and single-value check.

Checks that need the whole stack live in components/checks.py; reading the stack's values from
Pulumi lives in components/config.py. Models here are frozen: derived values are the plan's
(components/plan.py), never computed twice.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator,
)
from pydantic.alias_generators import to_camel

PROJECT = "vllm-dcu"

# The guide's quantization aliases, which the launcher resolves against the checkpoint's
# quantization_config; the vLLM methods a stack may name are its profile's (components/accelerators/).
QUANTIZATION_ALIASES = ("none", "int8", "int4")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

# Flags the program sets itself from typed keys; passing them again through extraArgs would
# silently fight the declared layout.
MANAGED_VLLM_FLAGS = (
    "--model", "--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp",
    "--pipeline-parallel-size", "-pp", "--distributed-executor-backend", "--quantization", "-q",
    "--dtype", "--max-num-seqs", "--max-num-batched-tokens", "--max-model-len",
    "--gpu-memory-utilization", "--api-key",
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_VERSION = re.compile(r"^[0-9]+(?:\.[0-9]+)*(?:[-+][0-9A-Za-z.+-]*)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:^,-]{1,64}$")
# registry[:port]/path[:tag][@sha256:<64 hex>]
_IMAGE_REF = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
# The first part of an image name is a registry host when it holds a '.' or a ':', or is localhost
# (Docker's rule); otherwise Docker Hub is implied.
_REGISTRY_HOST = re.compile(r"^(localhost|[^/]*[.:][^/]*)(?::[0-9]+)?/")
# Docker's ulimit names (github.com/docker/go-units, ulimit.go).
ULIMIT_NAMES = ("core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc",
                "rss", "rtprio", "rttime", "sigpending", "stack")
_SIZE = re.compile(r"^(?P<n>[0-9]+)(?P<unit>[kKmMgG]?)[bB]?$")
_SIZE_MB = {"": 1 / (1024 * 1024), "k": 1 / 1024, "m": 1, "g": 1024}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


Port = Annotated[int, Field(ge=1, le=65535)]


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address; give the node's address on the cluster network, e.g. 10.0.0.11"
        ) from None


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not absolute; use a path such as /data/models")
    return posixpath.normpath(value)


def _resource_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{value!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    return value


def _interface_name(value: str) -> str:
    if not _IFNAME.match(value):
        raise ValueError(f"{value!r} is not an interface name such as eth0 or ib0")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits and '_', not first a digit)")
    return value


def _env_value(value: object) -> str:
    """YAML numbers are fine (NCCL_MIN_NCHANNELS: 16); a YAML boolean is ambiguous, so it is refused."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a YAML boolean; quote the value the variable expects, e.g. \"1\"")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string; give the variable's value as text")
    return value


def _ulimit(value: object) -> tuple[int, int]:
    """(soft, hard) from -1, 65536 or "soft:hard"; -1 is unlimited (Docker's --ulimit memlock=-1:-1)."""
    parts = value.split(":") if isinstance(value, str) else [value]
    try:
        if isinstance(value, bool) or len(parts) > 2:
            raise ValueError
        soft, hard = int(parts[0]), int(parts[-1])
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a limit; write -1 (unlimited), a number, or \"soft:hard\"") from None
    if min(soft, hard) < -1 or (hard != -1 and (soft == -1 or soft > hard)):
        raise ValueError(f"{value!r}: the soft limit must not exceed the hard one (-1 = unlimited)")
    return soft, hard


def _url(value: str) -> str:
    """An http(s) base URL (a mirror, a package index); a trailing slash is dropped."""
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError(f"{value!r} is not an http(s) URL such as https://mirror.example/path")
    return value.rstrip("/") if value.count("/") > 2 else value


IPAddress = Annotated[str, AfterValidator(_ip_address)]
AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
ResourceName = Annotated[str, AfterValidator(_resource_name)]
InterfaceName = Annotated[str, AfterValidator(_interface_name)]
EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]
# Variables set on every node container before `ray start` (vendor recipes: NCCL_IB_HCA, NCCL_NET_GDR_READ, ...).
ExtraEnv = dict[EnvName, EnvValue]
Ulimit = Annotated[tuple[int, int], BeforeValidator(_ulimit)]
Url = Annotated[str, AfterValidator(_url)]
# A local image ID as `docker image inspect --format '{{.Id}}'` prints it.
_IMAGE_ID = re.compile(r"^sha256:[a-f0-9]{64}$")


def shm_size_mb(value: str) -> int:
    """Docker's shm size in MiB from '64g', '512m', '16GB'."""
    match = _SIZE.match(value.strip())
    if not match or int(match["n"]) == 0:
        raise ValueError(f"{value!r} is not a size; write e.g. 16g or 512m")
    return max(1, int(int(match["n"]) * _SIZE_MB[match["unit"].lower()]))


class Node(_Model):
    """One machine: the head or a worker."""

    address: IPAddress
    name: ResourceName | None = None
    ssh_user: str | None = None
    ssh_port: Port | None = None
    gpus: int = Field(default=0, ge=0)
    interface: InterfaceName | None = None
    # The node's address on the cluster (data-plane) network, when it is not `address` (the ssh one):
    # Ray, vLLM, NCCL and Gloo use it.
    cluster_address: IPAddress | None = None
    # Added to (and overriding) the stack's extraEnv on this node's containers.
    extra_env: ExtraEnv = {}

    @property
    def label(self) -> str:
        """Stable resource-name part: survives reordering of the workers list."""
        return self.name or self.address.replace(".", "-").replace(":", "-")


class Model(_Model):
    """One served model."""

    id: str = Field(min_length=1)
    source: Literal["huggingface", "modelscope", "local"] = "huggingface"
    revision: str = Field(default="main", min_length=1)
    local_path: AbsolutePath | None = None
    served_name: ResourceName | None = None
    port: Port | None = None
    # Copies on disjoint devices behind the gateway; 0 = as many as fit in the devices left.
    replicas: int = Field(default=1, ge=0)
    # How a settings change reaches the replicas: one at a time (rolling), or — for one replica —
    # a new copy on spare devices of the same node, switched to once healthy (blueGreen).
    update_strategy: Literal["rolling", "blueGreen"] = "rolling"
    # How the gateway picks a replica: fewest calls in flight, or (replicas of unequal speed) also each
    # replica's measured speed against the request's max_tokens (node_runtime.serving.gateway.replicas).
    balancing: Literal["leastOutstanding", "speedAware"] = "leastOutstanding"
    # Per replica. 0 = auto: with one replica every device of the cluster (TP = a node's devices,
    # PP = the nodes), with several one whole node each.
    tensor_parallel_size: int = Field(default=0, ge=0)
    pipeline_parallel_size: int = Field(default=0, ge=0)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    quantization: str = "none"
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    extra_args: list[str] = []
    allow_patterns: list[str] = []
    ignore_patterns: list[str] = []

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) > 2 or not all(_NAME.match(p) for p in parts):
            raise ValueError(
                f"{value!r} is not a repository id; write owner/name (e.g. meta-llama/Llama-3-8B-Instruct) or a bare name"
            )
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"{value!r} is unknown; use one of {', '.join(DTYPES)}")
        return value

    @field_validator("extra_args")
    @classmethod
    def _check_extra_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_VLLM_FLAGS:
                raise ValueError(
                    f"{flag} is set from this model's own keys; remove it from extraArgs and set "
                    "the matching key (tensorParallelSize, quantization, port, ...)"
                )
        return value

    @model_validator(mode="after")
    def _check_source(self) -> Model:
        if self.source == "local" and self.local_path is None:
            raise ValueError("source 'local' needs localPath: the model's absolute directory on the head")
        if self.source != "local" and self.local_path is not None:
            raise ValueError("localPath is only for source 'local'; remove it or set source: local")
        return self

    @property
    def name(self) -> str:
        """The name clients use, and the resource-name part of this model's server."""
        return self.served_name or self.directory

    @property
    def directory(self) -> str:
        """Directory under modelRoot: the repository's base name, as the guide downloads it."""
        return posixpath.basename(self.local_path) if self.local_path else self.id.split("/")[-1]


class RayPorts(_Model):
    """Ray's ports; all must be open between the nodes."""

    gcs: Port = 6379
    dashboard: Port = 8265
    object_manager: Port = 8076
    node_manager: Port = 8077
    client_server: Port = 10001
    metrics_export: Port = 8090
    # Ray picks these at random unless told: pinned, so a firewall can be written for them.
    dashboard_agent_grpc: Port = 8091
    dashboard_agent_listen: Port = 52365
    runtime_env_agent: Port = 8092
    min_worker: Port = 10002
    max_worker: Port = 19999

    @model_validator(mode="after")
    def _check_distinct(self) -> RayPorts:
        if self.min_worker >= self.max_worker:
            raise ValueError("minWorker must be below maxWorker")
        named = self.named()
        seen: dict[int, str] = {}
        for key, port in named.items():
            if port in seen:
                raise ValueError(f"{key} and {seen[port]} are both {port}; give each its own port")
            seen[port] = key
            if self.min_worker <= port <= self.max_worker:
                raise ValueError(
                    f"{key} ({port}) lies inside the worker port range {self.min_worker}-{self.max_worker}"
                )
        return self

    def named(self) -> dict[str, int]:
        """The single ports by stack key (the worker range excluded)."""
        keys = ("gcs", "dashboard", "object_manager", "node_manager", "client_server", "metrics_export",
                "dashboard_agent_grpc", "dashboard_agent_listen", "runtime_env_agent")
        return {to_camel(k): getattr(self, k) for k in keys}

    def collision(self, port: int) -> str | None:
        """Which Ray port or range `port` would collide with, if any."""
        for key, value in self.named().items():
            if value == port:
                return f"rayPorts.{key}"
        if self.min_worker <= port <= self.max_worker:
            return f"the Ray worker port range rayPorts.minWorker-maxWorker ({self.min_worker}-{self.max_worker})"
        return None


class Timeouts(_Model):
    """Seconds: the deploy-time gates (cold starts of large models take minutes), and one request."""

    cluster_ready: int = Field(default=900, ge=1)
    # The whole fabric and version check (`node-runtime cluster check`), which turns a hang into an error.
    cluster_check: int = Field(default=180, ge=10)
    model_download: int = Field(default=86400, ge=1)
    # How long `pulumi up` waits for a new server to pass its health check.
    server_ready: int = Field(default=1800, ge=1)
    # How long the gateway waits for the next byte of one answer before giving up on it (504).
    request: int = Field(default=600, ge=1)
    # How long a replica leaving on purpose may take to finish what it is answering before it is removed.
    drain: int = Field(default=120, ge=1)
    # How long the gateway waits for a request's whole body once its head is in (408 after).
    body_read: int = Field(default=30, ge=1)


# Names the gateway gives itself in /metrics: requests without a key, and the single apiKey.
RESERVED_KEY_NAMES = ("none", "default")


class ApiKey(_Model):
    """One named API key, without its secret value (`key`: components/config.py keeps it a Pulumi secret)."""

    name: ResourceName
    # Served names it may use; unset: every one.
    models: list[str] | None = Field(default=None, min_length=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    # Prompt + completion tokens.
    tokens_per_minute: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value in RESERVED_KEY_NAMES:
            raise ValueError(f"{value!r} is the gateway's own name for {'requests without a key' if value == 'none' else 'apiKey'}; "
                             "pick another name")
        return value


class StackConfig(_Model):
    """Everything a stack file says, validated as a whole."""

    cluster_name: ResourceName = "vllm"
    accelerator: Literal["dcu", "cpu"] = "dcu"
    head: Node
    workers: list[Node] = []
    ssh_user: str = "root"
    ssh_port: Port = 22
    local_docker: bool = False
    # Declared before base_image, whose check reads it: a base loaded from a tarball has no registry
    # digest, so it is pinned by the image ID the head holds.
    base_image_id: str | None = None
    base_image: str
    image_registry: str | None = None
    # Without imageRegistry: how the node image reaches the workers. relay: the head serves it on its
    # loopback, each worker pulls by digest through an ssh tunnel (only the layers it lacks move);
    # stream: the whole image, `docker save | ssh docker load`, for sites whose sshd forbids forwarding.
    image_transfer: Literal["relay", "stream"] = "relay"
    # Each node pulls baseImage from its registry (the vendor's or a site mirror) itself, and only our
    # runtime layer comes from the head's relay.
    nodes_pull_base: bool = False
    # The relay's port on the head's loopback, and the tunnel's end on each worker's loopback.
    image_relay_port: Port = 5550
    # The Python package index the image build installs from (a site mirror); unset: the DCU recipe
    # installs from the wheelhouse in its build context only, never from a public index.
    pip_index_url: Url | None = None
    # Model hubs' endpoints (mirrors), passed to the download step; unset: the hub's own.
    hf_endpoint: Url | None = None
    modelscope_endpoint: Url | None = None
    model_root: AbsolutePath = "/data/models"
    data_root: AbsolutePath = "/data/vllm-dcu"
    min_free_disk_gb: int = Field(default=50, ge=0)
    shm_size: str = "64g"
    ray_ports: RayPorts = RayPorts()
    api_port: Port = 8000
    api_bind_address: IPAddress = "0.0.0.0"
    server_port_base: Port = 8100
    nccl_socket_ifname: InterfaceName | None = None
    gloo_socket_ifname: InterfaceName | None = None
    mount_dtk: bool = False
    # Vendor settings on every node container (Ray's and the servers'), before `ray start`.
    extra_env: ExtraEnv = {}
    extra_devices: list[AbsolutePath] = []
    ulimits: dict[Literal[ULIMIT_NAMES], Ulimit] = {}  # type: ignore[valid-type]
    privileged: bool = False
    # The fabric check's rendezvous on the head (torch.distributed's TCP store).
    cluster_check_port: Port = 29555
    # The preflight refuses a host whose DCU driver is older (e.g. "6.3.8"); "" = any.
    min_driver_version: str | None = None
    max_batch_size: int = Field(default=64, ge=1)
    # Most sequences (`n`) one prompt may ask for, and most tokens (prompts x n x max_tokens) one batch may.
    max_n: int = Field(default=16, ge=1)
    max_batch_tokens: int = Field(default=262144, ge=1)
    # What the gateway reads of a request: its body, and its head (request line and headers).
    max_request_body_mb: int = Field(default=16, ge=1)
    max_header_kb: int = Field(default=64, ge=1)
    # Requests the gateway writes a JSON access-log line for: 0 (none) to 100 (every one).
    access_log_percent: int = Field(default=0, ge=0, le=100)
    # Named API keys beside apiKey; the names, models and limits here, their values a secret.
    api_keys: list[ApiKey] = []
    gateway_workers: int = Field(default=1, ge=1, le=64)
    timeouts: Timeouts = Timeouts()
    models: list[Model] = Field(min_length=1)

    @field_validator("api_keys")
    @classmethod
    def _check_api_key_names(cls, value: list[ApiKey]) -> list[ApiKey]:
        names = [key.name for key in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"each key needs its own name; repeated: {', '.join(repeated)}")
        return value

    @field_validator("base_image_id")
    @classmethod
    def _check_base_image_id(cls, value: str | None) -> str | None:
        if value is not None:
            if not _IMAGE_ID.match(value):
                raise ValueError(
                    f"{value!r} is not an image ID; write sha256:<64 hex> as "
                    "`docker image inspect --format '{{.Id}}' IMAGE` prints it on the head"
                )
            if set(value.removeprefix("sha256:")) == {"0"}:
                raise ValueError("the image ID is all zeros, a placeholder; put the one the head reports for baseImage")
        return value

    @field_validator("base_image")
    @classmethod
    def _check_base_image(cls, value: str, info: ValidationInfo) -> str:
        match = _IMAGE_REF.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not an image reference; write registry/path/name:tag@sha256:<digest>"
            )
        if "base_image_id" not in info.data:
            return value  # baseImageId itself is refused, with its own message
        pinned_by_id = info.data["base_image_id"] is not None
        if pinned_by_id and match["digest"]:
            raise ValueError(
                f"{value!r} carries a digest and baseImageId pins it by image ID: a base loaded from a tarball has "
                "no digest, so name it by its tag (name:tag) and keep baseImageId, or drop baseImageId"
            )
        if not match["digest"] and not pinned_by_id:
            raise ValueError(
                f"{value!r} is not pinned; append @sha256:<digest> "
                "(`docker inspect --format '{{index .RepoDigests 0}}' IMAGE` prints it) so every node runs the same build, "
                "or, for a base loaded from a tarball (no digest), set baseImageId to its image ID "
                "(`docker image inspect --format '{{.Id}}' IMAGE` on the head)"
            )
        if match["digest"] and set(match["digest"].removeprefix("sha256:")) == {"0"}:
            raise ValueError(
                "the digest is all zeros, a placeholder; put the one your registry reports for this tag "
                "(`docker inspect --format '{{index .RepoDigests 0}}' IMAGE`)"
            )
        return value

    @field_validator("nodes_pull_base")
    @classmethod
    def _check_nodes_pull_base(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            return value
        if info.data.get("base_image_id") is not None:
            raise ValueError("the nodes pull baseImage from its registry, which a base pinned by baseImageId (loaded "
                             "from a tarball) is not in: pin it by digest, or set nodesPullBase: false")
        if info.data.get("image_registry") is not None:
            raise ValueError("with imageRegistry every node pulls the whole image from that registry already; "
                             "remove nodesPullBase")
        if info.data.get("image_transfer") != "relay":
            raise ValueError("only the relay moves our layer alone (imageTransfer: relay); stream sends the whole image")
        return value

    @field_validator("image_registry")
    @classmethod
    def _check_registry(cls, value: str | None) -> str | None:
        if value is not None:
            match = _IMAGE_REF.match(value)
            if not match or match["tag"] or match["digest"]:
                raise ValueError(f"{value!r} is not a repository such as registry.local:5000/vllm-dcu")
            if not _REGISTRY_HOST.match(value):
                raise ValueError(
                    f"{value!r} names no registry host, which pushing needs; write host[:port]/path, "
                    "e.g. registry.local:5000/vllm-dcu (docker.io/<user>/<name> for Docker Hub)"
                )
        return value

    @field_validator("min_driver_version")
    @classmethod
    def _check_driver_version(cls, value: str | None) -> str | None:
        if value is not None and not _VERSION.match(value):
            raise ValueError(f"{value!r} is not a version such as 6.3.8 (hy-smi --showdriverversion prints yours)")
        return value

    @field_validator("cluster_name")
    @classmethod
    def _check_cluster_name(cls, value: str) -> str:
        if value != value.lower():
            raise ValueError(
                f"{value!r} has upper-case letters; it names the node image repository ({value}-node), "
                f"which Docker requires in lower case: use {value.lower()!r}"
            )
        return value

    @field_validator("shm_size")
    @classmethod
    def _check_shm(cls, value: str) -> str:
        shm_size_mb(value)
        return value

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.workers]
