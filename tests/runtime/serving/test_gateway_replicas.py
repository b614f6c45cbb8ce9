"""Pools of replicas behind one served name: least outstanding requests, one retry before the answer
starts, health checks in and out of the pool, route files read while the gateway runs, drain.

The replicas are shaped by the tests (upstreams.py), which must say when a replica answers, holds
a stream or fails. Routing decisions are made deterministic by the in-flight counts: a held stream
keeps a replica busier than the others, so the next request has exactly one right answer.
"""

import json
import subprocess
from contextlib import contextmanager

import httpx
import pytest

from tests.support.processes import (
    BIN, ThreadServer, eventually, free_ports, gateway_config, gateway_with_two_workers, gateway_workers,
    metric_families, route_path, write_route,
)
from .upstreams import FIRST_EVENT, REST_OF_STREAM, RawReplica, ShapedReplica

NEVER_PROBED = "127.0.0.1:1"  # a Ray address for gateways whose / and /health are not asked (Ray's probe would wait 20 s)
NO_PERIODIC_CHECKS = 3600.0  # a replica is then checked when its route appears, and never again


@pytest.fixture
def replicas():
    """ShapedReplica(name) for the test, every one stopped at its end."""
    started = []

    def start(name: str) -> ShapedReplica:
        started.append(ShapedReplica(name))
        return started[-1]

    yield start
    for replica in started:
        replica.stop()


@pytest.fixture
def model(request) -> str:
    """The served name, one per test: the in-process gateways of a test run share prometheus_client's
    registry, so each test's replicas have labels of their own."""
    return request.node.name.removeprefix("test_")[:40]


@pytest.fixture
def routes(tmp_path):
    path = tmp_path / "routes"
    path.mkdir()
    return path


@contextmanager
def gateway_in_process(routes, model: str, ray_address: str = NEVER_PROBED, nodes: int = 1, **options):
    """The gateway app on uvicorn in a thread of the test (as the other tests' in-process gateways)."""
    from node_runtime.serving.gateway.app import create_app
    from node_runtime.serving.gateway.config import GatewayConfig

    port = free_ports(1)[0]
    config = gateway_config(port, [model], routes, ray_address, request_timeout_s=30)
    config["cluster"]["expected_nodes"] = nodes
    server = ThreadServer(create_app(GatewayConfig.model_validate(config), cluster_ttl_s=3600, **options), port, "/v1/models")
    try:
        yield server.url
    finally:
        server.stop()


def replica_gauges(url: str, model: str) -> dict[str, dict[str, float]]:
    """Per replica of `model`: workers routing to it, calls in flight, healthy (from /metrics: no Ray asked)."""
    families = metric_families(url)
    gauges: dict[str, dict[str, float]] = {}
    for family in ("gateway_replica_routed", "gateway_replica_in_flight", "gateway_replica_healthy"):
        for sample in families[family].samples if family in families else []:  # absent: no replica yet
            if sample.labels["model"] == model:
                gauges.setdefault(sample.labels["replica"], {})[family.removeprefix("gateway_replica_")] = sample.value
    return gauges


def counter(url: str, family: str, **labels) -> float:
    return sum(sample.value for sample in metric_families(url)[family].samples
               if sample.name.endswith("_total") and labels.items() <= sample.labels.items())


def wait_routed(url: str, model: str, replica: str, workers: int = 1) -> None:
    def routed_and_healthy() -> bool:
        gauges = replica_gauges(url, model).get(replica, {})
        return gauges.get("routed") == workers and gauges.get("healthy") == 1

    eventually(routed_and_healthy, timeout=30, what=f"{replica} routed by {workers} worker(s) and healthy")


def hold_stream(client: httpx.Client, url: str, model: str):
    """A stream whose first event has come through: its replica now holds it (one call in flight)."""
    response = client.send(client.build_request("POST", url + "/v1/completions",
                                                json={"model": model, "prompt": "x", "stream": True}), stream=True)
    assert response.status_code == 200, response.read()
    chunks = response.iter_raw()  # kept with the response: an unreferenced iterator, once collected, hangs up
    assert next(chunks) == FIRST_EVENT
    return response, chunks


def complete(client: httpx.Client, url: str, model: str) -> httpx.Response:
    return client.post(url + "/v1/completions", json={"model": model, "prompt": "x"})


def test_each_request_goes_to_the_replica_with_the_fewest_in_flight(replicas, routes, model):
    a, b = replicas("a"), replicas("b")
    write_route(routes, model, f"{model}/a", a.url)
    write_route(routes, model, f"{model}/b", b.url)
    with gateway_in_process(routes, model) as url, httpx.Client(timeout=30) as client:
        held = [hold_stream(client, url, model) for _ in range(6)]
        # Each stream went to the replica holding fewer: 3 and 3 (random placement gives that 5 times in 16).
        assert (a.posts, b.posts) == (3, 3)
        in_flight = {replica: gauges["in_flight"] for replica, gauges in replica_gauges(url, model).items()}
        assert in_flight == {f"{model}/a": 3, f"{model}/b": 3}
        a.release()
        eventually(lambda: replica_gauges(url, model)[f"{model}/a"]["in_flight"] == 0, timeout=10, what="a's streams ended")
        a.hold()
        held += [hold_stream(client, url, model) for _ in range(2)]
        assert (a.posts, b.posts) == (5, 3)  # a had 0 in flight, b 3: both to a (round robin would give b one)
        assert {replica: gauges["in_flight"] for replica, gauges in replica_gauges(url, model).items()} == {
            f"{model}/a": 2, f"{model}/b": 3}
        assert [counter(url, "gateway_upstream_requests", replica=f"{model}/{name}", status="200") for name in "ab"] == [5, 3]
        b.release(), a.release()
        for response, chunks in held:
            b"".join(chunks)
            response.close()


@pytest.mark.slow
def test_a_refused_replica_leaves_the_pool_and_the_request_goes_to_another(replicas, routes, model, ray_head):
    a, b = replicas("a"), replicas("b")
    write_route(routes, model, f"{model}/a", a.url)
    with gateway_in_process(routes, model, ray_address=ray_head, check_interval_s=NO_PERIODIC_CHECKS) as url, httpx.Client(timeout=30) as client:
        held = hold_stream(client, url, model)  # on a, the only replica yet: a has 1 in flight
        write_route(routes, model, f"{model}/b", b.url)
        wait_routed(url, model, f"{model}/b")
        b.stop()  # refuses connections now; the gateway has not checked it since it joined
        answers = [complete(client, url, model) for _ in range(5)]
        assert [answer.status_code for answer in answers] == [200] * 5
        # The first went to b (0 in flight against a's 1), was refused, and went to a; b left the pool at once.
        assert a.posts == 6
        assert counter(url, "gateway_upstream_errors", replica=f"{model}/b", kind="unreachable") == 1
        assert counter(url, "gateway_upstream_requests", replica=f"{model}/b", status="none") == 1
        assert replica_gauges(url, model)[f"{model}/b"]["healthy"] == 0
        replica = client.get(url + "/").json()["replicas"][f"{model}/b"]
        assert replica["state"] == "unhealthy" and replica["problem"] == "not reachable (ClientConnectorError) by a request"
        a.release()
        assert b"".join(held[1]) == REST_OF_STREAM


def test_a_reset_before_the_answer_is_retried_and_an_answer_cut_short_is_not(replicas, routes, model):
    a = replicas("a")
    resetting, cutting = RawReplica("reset"), RawReplica("cut")
    write_route(routes, model, f"{model}/a", a.url)
    try:
        with gateway_in_process(routes, model, check_interval_s=NO_PERIODIC_CHECKS) as url, httpx.Client(timeout=30) as client:
            held = hold_stream(client, url, model)
            write_route(routes, model, f"{model}/reset", resetting.url)
            wait_routed(url, model, f"{model}/reset")
            assert complete(client, url, model).status_code == 200  # reset by m/reset before a byte, answered by a
            assert (resetting.posts, a.posts) == (1, 2)
            assert counter(url, "gateway_upstream_errors", replica=f"{model}/reset", kind="unreachable") == 1

            write_route(routes, model, f"{model}/cut", cutting.url)
            wait_routed(url, model, f"{model}/cut")
            cut = complete(client, url, model)  # to m/cut (0 in flight): its answer started, so it is not sent again
            assert cut.status_code == 503 and f"{model}/cut" in cut.json()["error"]["message"]
            with pytest.raises(httpx.HTTPError):  # a stream cut after its status line is cut for the client too
                with client.stream("POST", url + "/v1/completions", json={"model": model, "prompt": "x", "stream": True}) as cut:
                    assert cut.status_code == 200
                    b"".join(cut.iter_raw())
            assert (cutting.posts, a.posts) == (2, 2)
            assert counter(url, "gateway_upstream_errors", replica=f"{model}/cut", kind="protocol") == 1
            assert counter(url, "gateway_upstream_errors", replica=f"{model}/cut", kind="stream_broken") == 1
            assert replica_gauges(url, model)[f"{model}/cut"]["healthy"] == 1  # its health check still passes: it stays
            a.release()
            b"".join(held[1])
    finally:
        resetting.close()
        cutting.close()


def test_the_guides_endpoint_sends_an_answer_cut_short_once_to_another_replica(replicas, routes, model):
    """/generate answers in one piece, so nothing of it has reached the client when a replica breaks off
    its answer (killed mid-answer): the call goes once to another replica and the cut one leaves its pool."""
    a, cutting = replicas("a"), RawReplica("cut")
    write_route(routes, model, f"{model}/a", a.url)
    try:
        with gateway_in_process(routes, model, check_interval_s=NO_PERIODIC_CHECKS) as url, httpx.Client(timeout=30) as client:
            held = hold_stream(client, url, model)  # a holds one call: the next goes to m/cut (0 in flight)
            write_route(routes, model, f"{model}/cut", cutting.url)
            wait_routed(url, model, f"{model}/cut")
            answered = client.post(url + "/generate", json={"prompt": "x", "max_tokens": 2})
            assert answered.status_code == 200, answered.text
            assert (cutting.posts, a.posts) == (1, 2)
            assert counter(url, "gateway_upstream_errors", replica=f"{model}/cut", kind="protocol") == 1
            assert replica_gauges(url, model)[f"{model}/cut"]["healthy"] == 0
            a.release()
            b"".join(held[1])
    finally:
        cutting.close()


@pytest.mark.slow
def test_health_checks_take_a_replica_out_of_the_pool_and_back(replicas, routes, model, ray_head):
    a, b = replicas("a"), replicas("b")
    write_route(routes, model, f"{model}/a", a.url)
    write_route(routes, model, f"{model}/b", b.url, node="node-b")
    with gateway_in_process(routes, model, ray_address=ray_head) as url, httpx.Client(timeout=60) as client:
        assert client.get(url + "/health").json()["status"] == "ok"
        b.health_status = 503
        degraded = eventually(lambda: (health := client.get(url + "/health")).json()["replicas"][f"{model}/b"]["state"] == "unhealthy"
                              and health, timeout=30, what="m/b out of its pool")
        assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
        assert degraded.json()["models"] == {model: "degraded: 1 of 2 replicas healthy"}
        assert degraded.json()["degraded"] == [f"replica {model}/b on node-b: its /health answered 503"]
        posts = b.posts
        assert [complete(client, url, model).status_code for _ in range(10)] == [200] * 10 and b.posts == posts
        b.health_status = 200
        wait_routed(url, model, f"{model}/b")
        # Back in the pool: ties (nothing in flight) go either way; 30 all to a would be chance 1 in 2^30.
        assert [complete(client, url, model).status_code for _ in range(30)] == [200] * 30 and b.posts > posts

        a.health_status = b.health_status = 500
        down = eventually(lambda: (health := client.get(url + "/health")).status_code == 503 and health,
                          timeout=30, what="/health 503 with no healthy replica")
        assert down.json()["status"] == "unhealthy" and down.json()["unhealthy"] == [f"model {model}: no healthy replica"]
        refused = complete(client, url, model)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        assert f"model '{model}'" in refused.json()["error"]["message"] and f"{model}/a on node-0: its /health answered 500" in \
            refused.json()["error"]["message"]


@pytest.mark.slow
def test_ray_short_of_nodes_is_degraded_not_unavailable(replicas, routes, model, ray_head):
    write_route(routes, model, f"{model}/a", replicas("a").url)
    with gateway_in_process(routes, model, ray_address=ray_head, nodes=2) as url:
        health = httpx.get(url + "/health", timeout=60)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["degraded"] == ["ray cluster: 1 of 2 nodes alive, 0 of 0 GPUs"]


def test_the_internal_key_goes_to_the_replicas_and_the_clients_key_does_not(replicas, routes, model):
    a = replicas("a")
    write_route(routes, model, f"{model}/a", a.url)
    with gateway_in_process(routes, model, api_key="client-key", internal_key="replica-key") as url:
        answer = httpx.post(url + "/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer client-key"})
        assert answer.status_code == 200, answer.text
        httpx.get(url + "/metrics")
    assert a.authorizations and set(a.authorizations) == {"Bearer replica-key"}  # checks, the request, /metrics


def _logged(process, text: str) -> int:
    return process.log_path.read_text().count(text)


@pytest.mark.slow
def test_route_files_change_the_pools_of_a_running_gateway(replicas, routes, model, work_dir, ray_head):
    """`node-runtime gateway` with two workers, each reading the directory: replicas come and go, it never restarts."""
    a, b = replicas("a"), replicas("b")
    with gateway_with_two_workers([model], routes, ray_head, work_dir) as (url, process), httpx.Client(timeout=60) as client:
        workers = sorted(worker.pid for worker in gateway_workers(process.proc.pid))
        none = complete(client, url, model)
        assert none.status_code == 503 and "no replica is routed" in none.json()["error"]["message"]
        assert client.get(url + "/health").json()["models"] == {model: "unavailable: no replica is routed"}

        write_route(routes, model, f"{model}/a", a.url)
        wait_routed(url, model, f"{model}/a", workers=2)
        assert [complete(client, url, model).status_code for _ in range(4)] == [200] * 4 and a.posts == 4

        (routes / "bad.json").write_text(json.dumps({"model": model, "replica": f"{model}/x", "url": "not-a-url", "node": "n"}))
        (routes / "other.json").write_text(json.dumps({"model": "not-served", "replica": "o/0", "url": b.url, "node": "n"}))
        write_route(routes, model, f"{model}/b", b.url)
        wait_routed(url, model, f"{model}/b", workers=2)
        eventually(lambda: complete(client, url, model).status_code == 200 and b.posts > 0, timeout=30, what="b answering")
        bad, other = f"route file {routes / 'bad.json'}: url:", f"route file {routes / 'other.json'}: model: 'not-served'"
        assert (_logged(process, bad), _logged(process, other)) == (2, 2)  # once per worker
        assert set(replica_gauges(url, model)) == {f"{model}/a", f"{model}/b"}

        route_path(routes, f"{model}/a").unlink()
        eventually(lambda: replica_gauges(url, model)[f"{model}/a"]["routed"] == 0, timeout=10, what="a unrouted by both workers")
        posts = a.posts
        assert [complete(client, url, model).status_code for _ in range(6)] == [200] * 6 and a.posts == posts
        write_route(routes, model, f"{model}/c", b.url)  # the directory read again: the bad files are not logged again
        wait_routed(url, model, f"{model}/c", workers=2)
        assert (_logged(process, bad), _logged(process, other)) == (2, 2)
        assert sorted(worker.pid for worker in gateway_workers(process.proc.pid)) == workers  # never restarted


def _drain(url: str, replica: str, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "node-runtime"), "gateway", "drain", "--replica", replica,
                             "--metrics-url", url + "/metrics", "--timeout", str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_drain_waits_for_the_stream_in_progress_and_sends_the_replica_nothing_new(replicas, routes, model, work_dir):
    a, b = replicas("a"), replicas("b")
    write_route(routes, model, f"{model}/a", a.url)
    with gateway_with_two_workers([model], routes, NEVER_PROBED, work_dir) as (url, _), httpx.Client(timeout=60) as client:
        wait_routed(url, model, f"{model}/a", workers=2)
        held = hold_stream(client, url, model)  # on a, the only replica
        write_route(routes, model, f"{model}/b", b.url)
        wait_routed(url, model, f"{model}/b", workers=2)

        route_path(routes, f"{model}/a").unlink()
        drain = _drain(url, f"{model}/a", timeout=120)
        eventually(lambda: replica_gauges(url, model)[f"{model}/a"] == {"routed": 0, "in_flight": 1, "healthy": 1}, timeout=10,
                   what="a unrouted by both workers, its stream still in flight")
        assert [complete(client, url, model).status_code for _ in range(5)] == [200] * 5
        assert (a.posts, b.posts) == (1, 5)
        assert drain.poll() is None, drain.communicate()  # the stream is still going: not drained

        a.release()
        assert b"".join(held[1]) == REST_OF_STREAM  # the stream ran to its end
        out, err = drain.communicate(timeout=30)
        assert drain.returncode == 0 and out.strip() == f"replica {model}/a drained", err
        assert replica_gauges(url, model)[f"{model}/a"] == {"routed": 0, "in_flight": 0, "healthy": 1}


def test_drain_gives_up_after_its_timeout_naming_what_is_in_flight(replicas, routes, model):
    a = replicas("a")
    write_route(routes, model, f"{model}/a", a.url)
    with gateway_in_process(routes, model) as url, httpx.Client(timeout=30) as client:
        held = hold_stream(client, url, model)
        route_path(routes, f"{model}/a").unlink()
        out, err = _drain(url, f"{model}/a", timeout=2).communicate(timeout=60)
        assert out == "" and f"warning: replica {model}/a not drained after 2s: 1 requests in flight" in err
        a.release()
        b"".join(held[1])


def test_drain_with_no_gateway_has_nothing_to_drain():
    done = subprocess.run([str(BIN / "node-runtime"), "gateway", "drain", "--replica", "m/0", "--metrics-url",
                           f"http://127.0.0.1:{free_ports(1)[0]}/metrics", "--timeout", "600"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "nothing to drain" in done.stderr and done.stdout.strip() == "replica m/0 drained"
