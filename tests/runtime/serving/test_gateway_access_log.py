"""The access log: one JSON line per request on the real gateway's stderr, every request, a share, or none."""

import json
import time

import httpx
import pytest

from .conftest import INTERNAL_KEY, MODEL_NAME
from tests.support.processes import eventually, free_ports, gateway_config, start_gateway

pytestmark = pytest.mark.slow

KEY = "access-log-key-0123456789"


def _access_lines(process, since: int, request_ids: tuple[str, ...] | None = None) -> list[dict]:
    """The JSON lines the gateway wrote after `since` characters of its log (uvicorn's own lines are not JSON),
    those of `request_ids` only if given."""
    found = []
    for line in process.log_path.read_text()[since:].splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return [line for line in found if request_ids is None or line["request_id"] in request_ids]


@pytest.fixture
def logging_gateway(routes_dir, ray_head, work_dir):
    """`node-runtime gateway` with a key and the given accessLogPercent; stopped at the test's end."""
    started = []

    def start(percent: int):
        port = free_ports(1)[0]
        config = gateway_config(port, [MODEL_NAME], routes_dir, ray_head, access_log_percent=percent,
                                api_keys=[{"name": "team-a"}])
        started.append(start_gateway(config, work_dir, api_key=None, internal_key=INTERNAL_KEY, api_keys={"team-a": KEY}))
        return f"http://127.0.0.1:{port}", started[-1]

    yield start
    for process in started:
        process.stop()


def test_every_request_is_one_line_saying_who_what_where_and_how_long(logging_gateway):
    url, process = logging_gateway(100)
    auth = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(url + "/generate", json={"prompt": "Hello", "max_tokens": 3}, timeout=60,
                        headers={**auth, "X-Request-Id": "logged-1"})
    assert answer.status_code == 200
    with httpx.stream("POST", url + "/v1/completions", headers={**auth, "X-Request-Id": "logged-2"}, timeout=60,
                      json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True}) as stream:
        assert stream.status_code == 200 and stream.read()
    assert httpx.post(url + "/generate", json={"prompt": "x"}, headers={"X-Request-Id": "logged-3"}, timeout=60).status_code == 401
    # By request id: start_gateway's readiness check (a 401) is logged as it ends, which may be after it was answered.
    ids = ("logged-1", "logged-2", "logged-3")
    lines = eventually(lambda: (found := _access_lines(process, 0, ids)) and len(found) == 3 and found, timeout=10,
                       what="three access lines")
    # One line each, written by whichever gateway worker answered: in the order the workers wrote them.
    [generated] = [line for line in lines if line["endpoint"] == "/generate" and line["status"] == 200]
    [streamed] = [line for line in lines if line["endpoint"] == "/v1/completions"]
    [refused] = [line for line in lines if line["status"] == 401]
    assert (streamed["request_id"], refused["request_id"]) == ("logged-2", "logged-3")
    assert set(generated) == {"time", "request_id", "key", "method", "endpoint", "model", "replica", "status",
                              "latency_ms", "prompt_tokens", "completion_tokens"}
    assert generated["request_id"] == "logged-1" and generated["key"] == "team-a" and generated["endpoint"] == "/generate"
    assert generated["model"] == MODEL_NAME and generated["replica"] == f"{MODEL_NAME}/0" and generated["status"] == 200
    usage = answer.json()["usage"]
    assert (generated["prompt_tokens"], generated["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert 0 < generated["latency_ms"] < 60000 and generated["time"].endswith("+00:00")
    assert streamed["endpoint"] == "/v1/completions" and streamed["completion_tokens"] == 4
    assert (refused["key"], refused["status"], refused["model"], refused["replica"]) == ("none", 401, "none", None)
    assert KEY not in process.log_path.read_text()


def test_a_share_of_requests_or_none(logging_gateway):
    sampled, sampled_process = logging_gateway(50)
    quiet, quiet_process = logging_gateway(0)
    starts = {url: len(process.log_path.read_text()) for url, process in ((sampled, sampled_process), (quiet, quiet_process))}
    for url in (sampled, quiet):
        for _ in range(40):
            assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    time.sleep(1)  # lines are written as each request ends; give the last one time to land
    shared = len(_access_lines(sampled_process, starts[sampled]))
    assert 0 < shared < 40  # each request at 50%: all or none of 40 is a chance of 2 in 2**40
    assert _access_lines(quiet_process, starts[quiet]) == []
