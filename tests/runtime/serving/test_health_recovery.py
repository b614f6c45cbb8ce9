"""/health follows the real model server: 503 once its only replica is killed, 200 again once it is back,
found by the gateway's own checks (asking /health sends nothing to the replica)."""

import httpx
import pytest

from .conftest import MODEL_NAME
from tests.support.processes import eventually

pytestmark = pytest.mark.slow


def _health(gateway) -> httpx.Response:
    return httpx.get(gateway.url + "/health", timeout=60)


def test_health_follows_the_model_server(gateway, model_server):
    assert _health(gateway).status_code == 200
    model_server.kill()
    try:
        down = eventually(lambda: (answer := _health(gateway)).status_code == 503 and answer, timeout=30,
                          what="/health answering 503 with the only replica killed")
        report = down.json()
        assert report["status"] == "unhealthy" and report["models"][MODEL_NAME] == "unavailable: no healthy replica"
        assert report["replicas"][f"{MODEL_NAME}/0"]["problem"].startswith("not reachable")
        assert report["unhealthy"] == [f"model {MODEL_NAME}: no healthy replica"]
        generate = httpx.post(gateway.url + "/generate", json={"prompt": "x"}, timeout=60)
        assert generate.status_code == 503 and generate.json()["error"]["code"] == "model_unavailable"
        assert f"model '{MODEL_NAME}'" in generate.json()["error"]["message"]
    finally:
        model_server.restart()
    eventually(lambda: _health(gateway).status_code == 200, timeout=30, what="/health back to 200")
    assert httpx.post(gateway.url + "/generate", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200
