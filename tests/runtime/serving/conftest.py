"""Session-wide real parts: one Ray head, one tiny model served by vLLM's CPU build, one gateway."""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import (
    Process, ThreadServer, free_ports, gateway_config, serve_spec, start_gateway, start_model_server, start_ray_head, write_route,
)
from tests.support.tiny_model import build_tiny_llama
from .upstreams import RawReplica

MODEL_NAME = "tiny-llama"
API_KEY = "test-key-not-a-secret"
# What the gateway sends the replicas: the session's vLLM requires it on /v1, as replicas off the head do.
INTERNAL_KEY = "internal-test-key-not-a-secret"


@pytest.fixture(scope="session")
def work_dir():
    # Ray's unix socket paths must stay under ~100 characters: pytest's tmp paths are too deep.
    path = Path(tempfile.mkdtemp(prefix="nrs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(work_dir) -> Path:
    from node_runtime.modelstore.manifest import write_manifest

    model_dir = build_tiny_llama(work_dir / "models" / MODEL_NAME)
    write_manifest(model_dir, source="local", repo_id=f"test/{MODEL_NAME}", revision="test")
    return model_dir


@pytest.fixture(scope="session")
def ray_head(work_dir):
    head, address = start_ray_head(work_dir)
    yield address
    head.stop()


@dataclass
class ModelServer:
    spec: dict
    work: Path
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec['port']}"

    def kill(self) -> None:
        self.process.stop(grace=10)

    def restart(self) -> None:
        self.process = start_model_server(self.spec, self.work, api_key=INTERNAL_KEY)


@pytest.fixture(scope="session")
def model_server(tiny_model, ray_head, work_dir):
    spec = serve_spec(tiny_model, MODEL_NAME, free_ports(1)[0], ray_head)
    server = ModelServer(spec, work_dir, start_model_server(spec, work_dir, api_key=INTERNAL_KEY))
    yield server
    server.process.stop()


@dataclass
class Gateway:
    url: str
    api_key: str | None
    config: dict

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@pytest.fixture(scope="session")
def routes_dir(work_dir, model_server) -> Path:
    """The session's routes directory: the real server as the one replica of MODEL_NAME."""
    path = work_dir / "routes"
    path.mkdir()
    write_route(path, MODEL_NAME, f"{MODEL_NAME}/0", model_server.url)
    return path


@pytest.fixture(scope="session")
def gateway(routes_dir, ray_head, work_dir):
    """`node-runtime gateway` as the container runs it (no API key, as in the guide) in front of the real server."""
    port = free_ports(1)[0]
    # max_n: test_vllm_stops_generating_when_a_stream_client_hangs_up asks for 10 x the server's max_num_seqs
    config = gateway_config(port, [MODEL_NAME], routes_dir, ray_head, max_batch_size=8, request_timeout_s=120, max_n=512)
    process = start_gateway(config, work_dir, api_key=None, internal_key=INTERNAL_KEY)
    yield Gateway(f"http://127.0.0.1:{port}", None, config)
    process.stop()


@pytest.fixture(scope="session")
def routing_gateway(model_server, ray_head, work_dir):
    """An in-process gateway with an API key and three models: the real one, one refusing, one hanging;
    and a cluster expected to have 2 nodes (it has 1)."""
    from node_runtime.serving.gateway.app import create_app
    from node_runtime.serving.gateway.config import GatewayConfig

    silent = RawReplica("hang")
    refused_port, port = free_ports(2)
    routes = work_dir / "routing-gateway-routes"
    routes.mkdir()
    for model, url in ((MODEL_NAME, model_server.url), ("refusing", f"http://127.0.0.1:{refused_port}"),
                       ("hanging", silent.url)):
        write_route(routes, model, f"{model}/0", url)
    config = gateway_config(port, [MODEL_NAME, "refusing", "hanging"], routes, ray_head, max_batch_size=4,
                            request_timeout_s=3)
    config["cluster"]["expected_nodes"] = 2
    app = create_app(GatewayConfig.model_validate(config), api_key=API_KEY, internal_key=INTERNAL_KEY)
    server = ThreadServer(app, port, "/v1/models")
    yield Gateway(server.url, API_KEY, config)
    server.stop()
    silent.close()
