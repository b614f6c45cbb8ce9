"""Session-wide real parts: one Ray head, one tiny model served by vLLM's CPU build, one gateway."""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from .processes import Process, ThreadServer, cluster_json, free_ports, serve_spec, start_gateway, start_model_server, start_ray_head
from .tiny_model import build_tiny_llama

MODEL_NAME = "tiny-llama"
API_KEY = "test-key-not-a-secret"


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
        self.process = start_model_server(self.spec, self.work)


@pytest.fixture(scope="session")
def model_server(tiny_model, ray_head, work_dir):
    spec = serve_spec(tiny_model, MODEL_NAME, free_ports(1)[0], ray_head)
    server = ModelServer(spec, work_dir, start_model_server(spec, work_dir))
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
def gateway(model_server, ray_head, work_dir):
    """`node-runtime gateway` as the container runs it (no API key, as in the guide) in front of the real server."""
    port = free_ports(1)[0]
    config = {
        "host": "127.0.0.1", "port": port, "servers": [{"name": MODEL_NAME, "url": model_server.url}],
        "cluster": cluster_json(ray_head), "max_batch_size": 8, "request_timeout_s": 120,
    }
    process = start_gateway(config, work_dir, api_key=None)
    yield Gateway(f"http://127.0.0.1:{port}", None, config)
    process.stop()


class SilentServer:
    """Accepts TCP connections and never answers: a model server that hangs."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _hold(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self):
        self.sock.close()
        for connection in self.held:
            connection.close()


@pytest.fixture(scope="session")
def routing_gateway(model_server, ray_head):
    """An in-process gateway with an API key and three models: the real one, one refusing, one hanging;
    and a cluster expected to have 2 nodes (it has 1)."""
    from node_runtime.serving.gateway import create_app
    from node_runtime.serving.spec import GatewayConfig

    silent = SilentServer()
    refused_port, port = free_ports(2)
    config = {
        "host": "127.0.0.1", "port": port, "max_batch_size": 4, "request_timeout_s": 3,
        "servers": [{"name": MODEL_NAME, "url": model_server.url},
                    {"name": "refusing", "url": f"http://127.0.0.1:{refused_port}"},
                    {"name": "hanging", "url": f"http://127.0.0.1:{silent.port}"}],
        "cluster": cluster_json(ray_head, nodes=2),
    }
    server = ThreadServer(create_app(GatewayConfig.model_validate(config), api_key=API_KEY), port, "/v1/models")
    yield Gateway(server.url, API_KEY, config)
    server.stop()
    silent.close()
