"""`node-runtime serve`, `node-runtime gateway`, `node-runtime cluster wait` and `cluster check`."""

import json
import os
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from node_runtime.errors import exits_cleanly, fail
from node_runtime.serving.cluster import ClusterNotReady, wait_for_cluster
from node_runtime.serving.fabric import DEFAULT_PORT, FabricCheckFailed, check_fabric
from node_runtime.serving.launcher import LaunchError, launch
from node_runtime.serving.quantization import QuantizationError
from node_runtime.serving.gateway.config import GatewayConfig
from node_runtime.serving.spec import ClusterSpec, ServeSpec, describe_validation_error

SERVE_SPEC_ENV = "NODE_RUNTIME_SERVE_SPEC"
GATEWAY_CONFIG_ENV = "NODE_RUNTIME_GATEWAY_CONFIG"
API_KEY_ENV = "NODE_RUNTIME_API_KEY"
# The named keys' secrets, a JSON object name -> secret; their models and limits are the config's api_keys.
API_KEYS_ENV = "NODE_RUNTIME_API_KEYS"
INTERNAL_KEY_ENV = "NODE_RUNTIME_INTERNAL_KEY"

FAILED_CHECKS = (ClusterNotReady, LaunchError, QuantizationError)
Spec = TypeVar("Spec", bound=BaseModel)


def spec_from_env(variable: str, model: type[Spec]) -> Spec:
    """The JSON in `variable`, validated; bad usage (exit 2) names the variable and the field."""
    raw = os.environ.get(variable)
    if not raw:
        raise fail(f"{variable} is not set: it must hold the JSON described in docs/runtime-contract.md", 2)
    try:
        return model.model_validate(json.loads(raw))
    except json.JSONDecodeError as bad:
        raise fail(f"{variable} is not valid JSON: {bad}", 2) from None
    except ValidationError as invalid:
        raise fail(describe_validation_error(invalid, variable), 2) from None


@exits_cleanly(*FAILED_CHECKS)
def serve() -> None:
    """Wait for the Ray cluster, verify the model, then run vLLM's OpenAI server for one model (spec from NODE_RUNTIME_SERVE_SPEC)."""
    launch(spec_from_env(SERVE_SPEC_ENV, ServeSpec))


gateway_commands = typer.Typer(invoke_without_command=True)


@gateway_commands.callback()
def gateway(context: typer.Context) -> None:
    """Run the HTTP gateway (config from NODE_RUNTIME_GATEWAY_CONFIG, API keys from NODE_RUNTIME_API_KEY,
    NODE_RUNTIME_API_KEYS and NODE_RUNTIME_INTERNAL_KEY)."""
    if context.invoked_subcommand is not None:
        return
    import uvicorn

    from node_runtime.serving.gateway.keys import Keys, KeysError, parse_named_keys
    from node_runtime.serving.gateway.metrics import shared_between_processes

    config = spec_from_env(GATEWAY_CONFIG_ENV, GatewayConfig)
    try:  # checked here once, so that a mismatch is one line and exit 2, not a traceback per worker
        Keys(os.environ.get(API_KEY_ENV), parse_named_keys(os.environ.get(API_KEYS_ENV)), config.api_keys)
    except KeysError as bad:
        raise fail(str(bad), 2) from None
    with shared_between_processes(config.workers > 1):
        # uvicorn's own access lines are off: the gateway's (access_log.py) say more, sampled, when asked for.
        # Workers are uvicorn's: processes sharing the listening socket, each building the app from the env.
        uvicorn.run("node_runtime.serving.cli:gateway_app", factory=True, workers=config.workers,
                    host=config.host, port=config.port, access_log=False, log_level="info",
                    http="node_runtime.serving.gateway.http_protocol:HeadLimitedProtocol",
                    h11_max_incomplete_event_size=config.max_header_bytes,  # the head's limit, see http_protocol.py
                    proxy_headers=False)  # clients' addresses are never used: no X-Forwarded-* to parse


def gateway_app():
    """The gateway's ASGI app, in whichever process uvicorn runs it."""
    from node_runtime.serving.gateway.app import create_app
    from node_runtime.serving.gateway.keys import parse_named_keys

    return create_app(spec_from_env(GATEWAY_CONFIG_ENV, GatewayConfig), api_key=os.environ.get(API_KEY_ENV),
                      api_keys=parse_named_keys(os.environ.get(API_KEYS_ENV)), internal_key=os.environ.get(INTERNAL_KEY_ENV))


@gateway_commands.command("drain")
def drain(
    replica: Annotated[str, typer.Option(help="the replica's id, as its route file names it")],
    metrics_url: Annotated[str, typer.Option(help="the gateway's /metrics URL")],
    timeout: Annotated[float, typer.Option(min=0, help="seconds to wait for its requests to end")] = 120,
) -> None:
    """Exit 0 once no gateway worker routes to REPLICA and none of its requests is in flight (at once if the
    gateway is not reachable); after the timeout exit 0 too, warning what was still in flight."""
    from node_runtime.serving.gateway.drain import drain as wait_drained

    still = wait_drained(replica, metrics_url, timeout, report=lambda line: typer.echo(line, err=True))
    if still is None:
        typer.echo(f"replica {replica} drained")
    else:
        typer.echo(f"warning: replica {replica} not drained after {timeout:g}s: {still}; removing it cuts those requests",
                   err=True)


cluster_app = typer.Typer(no_args_is_help=True, help="The Ray cluster's readiness.")


@cluster_app.command("wait")
@exits_cleanly(ClusterNotReady)
def wait(
    address: Annotated[str, typer.Option(help="HEAD_IP:RAY_PORT of the Ray head")],
    nodes: Annotated[int, typer.Option(min=1, help="alive nodes to wait for")],
    gpus: Annotated[int, typer.Option(min=0, help="GPUs (cluster total) to wait for")] = 0,
    timeout: Annotated[float, typer.Option(min=1, help="seconds before giving up")] = 900,
) -> None:
    """Exit 0 once Ray reports at least NODES alive nodes and GPUS GPUs; 1 on timeout, naming what is missing."""
    try:
        spec = ClusterSpec(ray_address=address, expected_nodes=nodes, expected_gpus=gpus, timeout_s=timeout)
    except ValidationError as invalid:
        raise fail(describe_validation_error(invalid, "--address/--nodes/--gpus/--timeout"), 2) from None
    state = wait_for_cluster(spec, report=lambda line: typer.echo(line, err=True))
    typer.echo(f"Ray cluster at {address} ready: {state.nodes} nodes, {state.gpus:g} GPUs")


@cluster_app.command("check")
@exits_cleanly(FabricCheckFailed)
def check(
    address: Annotated[str, typer.Option(help="HEAD_IP:RAY_PORT of the Ray head (run this on the head)")],
    nodes: Annotated[int, typer.Option(min=1, help="alive nodes the cluster must have")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="free TCP port on the head for the rendezvous")] = DEFAULT_PORT,
    timeout: Annotated[float, typer.Option(min=10, help="seconds for the whole check")] = 120,
    nccl: Annotated[bool, typer.Option("--nccl", help="also all-reduce with NCCL/RCCL across the nodes with GPUs")] = False,
) -> None:
    """Same Python/Ray/vLLM/torch on every node, and a Gloo (with --nccl also NCCL/RCCL) all-reduce across them.

    Prints a JSON summary on stdout; on failure exits 1 with one line per failing node.
    """
    try:
        spec = ClusterSpec(ray_address=address, expected_nodes=nodes, expected_gpus=0, timeout_s=timeout)
    except ValidationError as invalid:
        raise fail(describe_validation_error(invalid, "--address/--nodes/--timeout"), 2) from None
    result = check_fabric(spec, port=port, nccl=nccl, report=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(result.summary()))
    if not result.ok:
        raise FabricCheckFailed("\n".join(result.failure_lines()))
    typer.echo(f"cluster check passed: {len(result.nodes)} nodes, same versions, all-reduce in {result.seconds:.0f}s", err=True)


__all__ = ["serve", "gateway_commands", "cluster_app"]
