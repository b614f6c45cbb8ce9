"""/health follows the model server: 503 once it is killed, 200 again once it is back."""

import httpx
import pytest

from .conftest import MODEL_NAME

pytestmark = pytest.mark.slow


def test_health_follows_the_model_server(gateway, model_server):
    assert httpx.get(gateway.url + "/health", timeout=60).status_code == 200
    model_server.kill()
    try:
        down = httpx.get(gateway.url + "/health", timeout=60)
        assert down.status_code == 503
        assert down.json()["models"][MODEL_NAME].startswith("not reachable")
        assert any(part.startswith(f"model {MODEL_NAME}:") for part in down.json()["unhealthy"])
        generate = httpx.post(gateway.url + "/generate", json={"prompt": "x"}, timeout=60)
        assert generate.status_code == 503 and generate.json()["error"]["code"] == "model_unavailable"
    finally:
        model_server.restart()
    back = httpx.get(gateway.url + "/health", timeout=60)
    assert back.status_code == 200, back.text
    assert httpx.post(gateway.url + "/generate", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200
