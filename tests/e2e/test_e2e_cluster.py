"""End to end: the program's declarations applied to three simulated hosts (head + 2 workers, CPU
profile), a real Ray cluster across them, the tiny model distributed and served, faults survived,
and the model files still on every host after teardown.

The tests run in file order against one deployment (each step builds on the one before).
Needs root (network namespaces, Docker engines); CI runs it through scripts/test.sh.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import httpx
import pytest
from openai import OpenAI

from tests.e2e.apply import apply
from tests.e2e.cluster import (
    CLUSTER_NAME, MODEL_NAME, MODEL_ROOT, MODEL_SOURCE, e2e_cluster, generate, health, wait_until,
)
from tests.runtime.serving.tiny_model import build_tiny_llama

pytestmark = pytest.mark.slow

RAY_HEAD = f"{CLUSTER_NAME}-ray-head"
RAY_WORKER = f"{CLUSTER_NAME}-ray-worker"
SERVER = f"{CLUSTER_NAME}-server-{MODEL_NAME}"
GATEWAY = f"{CLUSTER_NAME}-gateway"


@pytest.fixture(scope="module")
def e2e():
    with e2e_cluster(build_tiny_llama) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def deployed(e2e):
    started = time.monotonic()
    run = apply(e2e.config, e2e.applier, secrets=e2e.secrets)
    wait_until(lambda: generate(e2e.gateway, "Hello", 1), timeout=300, what="first token through the gateway")
    e2e.timings.update(bring_up_to_first_token_s=time.monotonic() - started,
                       image_build_s=e2e.image_build_seconds)
    return run


def _container_pid(e2e, host, name: str) -> int:
    return int(e2e.docker(host, "inspect", "--format", "{{.State.Pid}}", name).stdout.strip())


def _restart_count(e2e, host, name: str) -> int:
    return int(e2e.docker(host, "inspect", "--format", "{{.RestartCount}}", name).stdout.strip())


def _crash(e2e, host, name: str) -> None:
    """A crash, not a stop: SIGKILL to the container's main process, from outside Docker."""
    subprocess.run(["kill", "-KILL", str(_container_pid(e2e, host, name))], check=True)


def _health_sequence(gateway: str, until, *, timeout: float) -> list[tuple[int, dict]]:
    """/health answers, polled until `until(code, body)` holds (bounded)."""
    seen: list[tuple[int, dict]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(health(gateway))
        if until(*seen[-1]):
            return seen
        time.sleep(1)
    raise AssertionError(f"/health never satisfied the condition in {timeout}s; last answers: {seen[-3:]}")


def test_ray_reports_every_host_as_a_node(e2e, deployed):
    assert e2e.ray_alive_nodes() == sorted(h.address for h in e2e.cluster.hosts)


def test_model_is_distributed_and_verified_on_every_host(e2e, deployed):
    source = e2e.on_host(e2e.head, MODEL_SOURCE)
    expected = {p.relative_to(source).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in source.rglob("*") if p.is_file()}
    assert "config.json" in expected
    image = e2e.docker(e2e.head, "inspect", "--format", "{{.Image}}", SERVER).stdout.strip()
    for host in e2e.cluster.hosts:
        model_dir = e2e.on_host(host, f"{MODEL_ROOT}/{MODEL_NAME}")
        copied = {p.relative_to(model_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in model_dir.rglob("*") if p.is_file() and p.name != ".manifest.json"}
        assert copied == expected, host.name
        manifest = json.loads((model_dir / ".manifest.json").read_text())
        assert manifest["repo_id"] == f"local/{MODEL_NAME}"
        # The runtime's own check, on that host, with that host's copy of the node image.
        e2e.cluster.ssh(host, f"docker run --rm -v {MODEL_ROOT}:{MODEL_ROOT} {image} "
                              f"node-runtime model verify {MODEL_ROOT}/{MODEL_NAME} --hash full", timeout=120)


def test_every_host_runs_the_same_node_image(e2e, deployed):
    ids = {e2e.docker(h, "inspect", "--format", "{{.Image}}", RAY_HEAD if h is e2e.head else RAY_WORKER).stdout.strip()
           for h in e2e.cluster.hosts}
    assert len(ids) == 1


def test_the_guides_curl_is_answered(e2e, deployed):
    # deploy-guide.en.md §4, verbatim but for the head's address.
    result = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{e2e.gateway}/generate", "-H", "Content-Type: application/json",
         "-d", '{"prompt": "Hello, I am a", "max_tokens": 50}'],
        capture_output=True, text=True, timeout=120, check=True,
    )
    answer = json.loads(result.stdout)
    assert answer["text"] and answer["usage"]["completion_tokens"] >= 1


def test_batch_health_metrics_and_openai_client(e2e, deployed):
    batch = httpx.post(f"{e2e.gateway}/batch_generate",
                       json={"prompts": ["Hello", "The quick brown fox"], "max_tokens": 8}, timeout=120)
    assert batch.status_code == 200, batch.text
    assert len(batch.json()["results"]) == 2

    code, body = health(e2e.gateway)
    assert code == 200 and body["status"] == "ok", body

    metrics = httpx.get(f"{e2e.gateway}/metrics", timeout=30)
    assert metrics.status_code == 200 and "gateway_requests" in metrics.text

    client = OpenAI(base_url=f"{e2e.gateway}/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    completion = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant"


def test_no_change_reapply_touches_nothing(e2e, deployed):
    before = {h.name: e2e.docker(h, "ps", "-q", "--no-trunc").stdout.split() for h in e2e.cluster.hosts}
    started = time.monotonic()
    apply(e2e.config, e2e.applier, secrets=e2e.secrets)
    e2e.timings["no_change_reapply_s"] = time.monotonic() - started
    assert e2e.applier.log.changed() == {}
    assert {h.name: e2e.docker(h, "ps", "-q", "--no-trunc").stdout.split() for h in e2e.cluster.hosts} == before


def test_crashed_worker_restarts_and_rejoins_while_health_reports_it(e2e, deployed):
    worker = e2e.workers[0]
    restarts = _restart_count(e2e, worker, RAY_WORKER)
    bridge_end = f"{worker.netns}b"
    # Cut the worker's link first, so its restarted raylet cannot rejoin before the head notices.
    subprocess.run(["ip", "link", "set", bridge_end, "down"], check=True)
    try:
        _crash(e2e, worker, RAY_WORKER)
        degraded = _health_sequence(e2e.gateway, lambda code, body: code == 503, timeout=120)
        assert any("ray cluster" in problem for problem in degraded[-1][1]["unhealthy"]), degraded[-1]
    finally:
        subprocess.run(["ip", "link", "set", bridge_end, "up"], check=True)
    wait_until(lambda: e2e.ray_alive_nodes() == sorted(h.address for h in e2e.cluster.hosts),
               timeout=300, interval=5, what="the worker rejoining Ray")
    _health_sequence(e2e.gateway, lambda code, body: code == 200, timeout=120)
    assert _restart_count(e2e, worker, RAY_WORKER) > restarts


def test_crashed_model_server_comes_back(e2e, deployed):
    restarts = _restart_count(e2e, e2e.head, SERVER)
    _crash(e2e, e2e.head, SERVER)
    down = _health_sequence(e2e.gateway, lambda code, body: body.get("models", {}).get(MODEL_NAME, "ok") != "ok",
                            timeout=60)
    assert down[-1][0] == 503
    _health_sequence(e2e.gateway, lambda code, body: code == 200, timeout=600)
    assert _restart_count(e2e, e2e.head, SERVER) > restarts
    assert generate(e2e.gateway, "Hello", 4)


def test_restarted_head_gets_its_workers_back(e2e, deployed):
    e2e.cluster.ssh(e2e.head, f"docker restart {RAY_HEAD}", timeout=120)
    wait_until(lambda: e2e.ray_alive_nodes() == sorted(h.address for h in e2e.cluster.hosts),
               timeout=420, interval=5, what="the workers reconnecting to the restarted head")
    _health_sequence(e2e.gateway, lambda code, body: code == 200, timeout=180)
    assert generate(e2e.gateway, "Hello", 4)


def test_teardown_keeps_the_model_on_every_host(e2e, deployed):
    removed = e2e.applier.destroy(deployed)
    # The relay key's authorization is revoked (its delete step ran), after the containers went.
    assert removed.index(f"{CLUSTER_NAME}-w1-relay-authorized") > removed.index(f"{GATEWAY}-container")
    for worker in e2e.workers:
        assert "relay" not in e2e.cluster.ssh(worker, "cat ~/.ssh/authorized_keys || true").stdout
    for host in e2e.cluster.hosts:
        assert e2e.docker(host, "ps", "-aq").stdout.split() == [], host.name
        model_dir = e2e.on_host(host, f"{MODEL_ROOT}/{MODEL_NAME}")
        assert (model_dir / ".manifest.json").is_file() and (model_dir / "config.json").is_file(), host.name
    print(f"\ne2e timings: {json.dumps(e2e.timings)}")
