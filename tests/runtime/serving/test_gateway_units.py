import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from node_runtime.serving.gateway.config import RouteFile
from node_runtime.serving.gateway.drain import replica_load
from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.generate import BatchGenerateRequest, GenerateRequest, generate, parse
from node_runtime.serving.gateway.health import CHECK_TIMEOUT, UNANSWERED_PROBES_TO_LEAVE, check_replicas
from node_runtime.serving.gateway.keys import Keys
from node_runtime.serving.gateway.metrics import relabel_vllm_metrics
from node_runtime.serving.gateway.openai_api import asked_tokens, forward
from node_runtime.serving.gateway.replicas import ALIKE_WITHIN, STALE_CALLS, Pools
from node_runtime.serving.gateway.route_files import RouteFiles
from node_runtime.serving.gateway.upstream import served_model
from tests.support.processes import free_ports

VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="%s"} %d.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="%s"} 42.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 7.0
"""


def test_served_model():
    assert served_model(["a", "b"], "b") == "b"
    assert served_model(["a"], None) == "a"
    with pytest.raises(GatewayError) as unknown:
        served_model(["a", "b"], "c")
    assert unknown.value.status == 404 and "served models: a, b" in unknown.value.message
    with pytest.raises(GatewayError) as ambiguous:
        served_model(["a", "b"], None)
    assert ambiguous.value.status == 422 and ambiguous.value.param == "model"


def test_vllm_metrics_merged_with_model_and_replica_labels():
    text = relabel_vllm_metrics({("a", "a/0"): VLLM_METRICS % ("a", 1, "a"), ("a", "a/1"): VLLM_METRICS % ("a", 2, "a"),
                                 ("b", "b/0"): VLLM_METRICS % ("b", 3, "b")}).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) == {"vllm:num_requests_running", "vllm:prompt_tokens"}  # only vllm:*
    running = {(sample.labels["model"], sample.labels["replica"]): sample.value
               for sample in families["vllm:num_requests_running"].samples}
    assert running == {("a", "a/0"): 1.0, ("a", "a/1"): 2.0, ("b", "b/0"): 3.0}
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


@pytest.mark.parametrize("body, param, message", [
    (b'{"max_tokens": 5}', "prompt", "prompt: Field required"),
    (b'{"prompt": "x", "max_token": 5}', "max_token", "max_token: unknown field"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
    (b'{"prompts": ["a", 7]}', "prompts[1]", "prompts[1]: Input should be a valid string"),
    (b'{"prompt": "x"', None, "request body is not valid JSON: EOF while parsing"),
    (b'[1, 2]', "body", "body: Input should be an object"),
])
def test_parse_names_the_field_as_the_client_wrote_it(body, param, message):
    model = BatchGenerateRequest if b"prompts" in body else GenerateRequest
    with pytest.raises(GatewayError) as invalid:
        parse(model, body)
    assert invalid.value.status == 422 and invalid.value.param == param
    assert invalid.value.message.startswith(message), invalid.value.message


def _route(model: str, index: int, port: int = 8100) -> RouteFile:
    return RouteFile(model=model, replica=f"{model}/{index}", url=f"http://10.0.0.{index + 1}:{port}", node=f"node-{index}")


def _healthy_pools(model: str, count: int, speed_aware: bool = False) -> tuple[Pools, list]:
    pools = Pools([model], speed_aware=[model] if speed_aware else [])
    replicas = pools.apply({route.replica: route for route in (_route(model, i) for i in range(count))})
    for replica in replicas:
        pools.set_problem(replica, None)
    return pools, replicas


def test_pick_prefers_the_fewest_in_flight_and_breaks_ties_at_random():
    pools, (a, b, c) = _healthy_pools("units-pick", 3)
    a.begin(), a.begin(), b.begin()
    assert {pools.pick("units-pick").id for _ in range(50)} == {c.id}
    c.begin(), c.begin()  # a 2, b 1, c 2
    assert pools.pick("units-pick") is b
    assert pools.pick("units-pick", avoid=b) in (a, c)
    b.begin()  # all at 2: each tied replica is picked, none always
    picks = [pools.pick("units-pick").id for _ in range(300)]
    assert {picks.count(replica.id) for replica in (a, b, c)} <= set(range(60, 141)), picks


def test_pick_weighs_max_tokens_by_the_speeds_it_measured_and_is_least_outstanding_until_then():
    pools, (fast, slow) = _healthy_pools("units-cost", 2, speed_aware=True)
    fast.measured(1.0, 100)  # 10 ms per token: only one replica known, so in-flight counts alone decide
    picks = [pools.pick("units-cost", tokens=128).id for _ in range(200)]
    assert {picks.count(replica.id) for replica in (fast, slow)} <= set(range(60, 141)), picks
    slow.measured(2.0, 100)  # 20 ms per token: twice as slow
    assert fast.seconds_per_token == 0.01 and slow.seconds_per_token == 0.02
    assert {pools.pick("units-cost", tokens=128) for _ in range(50)} == {fast}  # a long request: the fast one
    assert {pools.pick("units-cost") for _ in range(200)} == {fast, slow}  # no max_tokens: ties at random
    fast.begin(), fast.begin(), fast.begin()  # 3 more in flight: a long request still waits for the fast one
    assert pools.pick("units-cost", tokens=128) is fast
    assert {pools.pick("units-cost", tokens=16) for _ in range(20)} == {slow}  # a short one loses little there
    fast.begin(), fast.begin()  # 5 more (COST_WEIGHT 4, the usual request 128 tokens): the fast one is too busy
    assert pools.pick("units-cost", tokens=128) is slow
    assert pools.pick("units-cost", tokens=128, avoid=slow) is fast


def test_speeds_weigh_nothing_for_a_model_left_least_outstanding():
    pools, (fast, slow) = _healthy_pools("units-not-speed-aware", 2)
    fast.measured(1.0, 100)
    slow.measured(4.0, 100)
    picks = [pools.pick("units-not-speed-aware", tokens=128).id for _ in range(200)]
    assert {picks.count(replica.id) for replica in (fast, slow)} <= set(range(60, 141)), picks


def test_a_speed_not_measured_while_the_others_answered_is_forgotten_until_that_replica_answers_again():
    pools, (fast, slow) = _healthy_pools("units-stale", 2, speed_aware=True)
    slow.measured(2.0, 100)  # 20 ms per token: its first answer, slow (cold)
    fast.measured(1.0, 100)  # 10 ms per token
    assert {pools.pick("units-stale", tokens=100) for _ in range(50)} == {fast}
    # The fast one keeps answering: within STALE_CALLS of its usual calls (1 s each) the slow one's speed stands.
    fast.speed_measured_at = slow.speed_measured_at + STALE_CALLS * 1.0 - 0.1
    assert pools.pick("units-stale", tokens=100) is fast and slow.seconds_per_token == 0.02
    fast.speed_measured_at += 0.2  # older than that: forgotten, and the pool is least outstanding again
    picks = [pools.pick("units-stale", tokens=100).id for _ in range(200)]
    assert slow.seconds_per_token is None
    assert {picks.count(replica.id) for replica in (fast, slow)} <= set(range(60, 141)), picks
    slow.measured(1.0, 100)  # timed anew, now as fast: its cold answer is not averaged in
    assert slow.seconds_per_token == 0.01
    fast.begin()
    assert {pools.pick("units-stale", tokens=100) for _ in range(50)} == {slow}


def test_speeds_alike_keep_least_outstanding_with_random_ties():
    pools, (a, b, c) = _healthy_pools("units-cost-equal", 3, speed_aware=True)
    a.measured(0.64, 64)
    b.measured(0.64 * ALIKE_WITHIN * 0.99, 64)  # just slow enough to still count as alike
    c.measured(0.70, 64)
    a.begin()
    assert {pools.pick("units-cost-equal", tokens=100).id for _ in range(100)} == {b.id, c.id}
    b.begin(), c.begin()  # all at 1
    picks = [pools.pick("units-cost-equal", tokens=100).id for _ in range(300)]
    assert {picks.count(replica.id) for replica in (a, b, c)} <= set(range(60, 141)), picks
    b.measured(6.4, 64)  # one answer at 0.1 s per token pulls its average past ALIKE_WITHIN x the fastest
    assert b.seconds_per_token > ALIKE_WITHIN * a.seconds_per_token
    assert {pools.pick("units-cost-equal", tokens=100).id for _ in range(100)} == {a.id, c.id}


def test_a_replica_learns_its_speed_only_from_calls_answered_in_full():
    pools, (replica,) = _healthy_pools("units-speed", 1)
    replica.end(replica.begin())  # a failed call, or one whose max_tokens is not known: teaches nothing
    assert replica.seconds_per_token is None
    started = replica.begin()
    time.sleep(0.05)
    replica.end(started, tokens=10)
    assert 0.005 <= replica.seconds_per_token < 0.05
    first = replica.seconds_per_token
    replica.measured(1.0, 10)  # 0.1 s per token: a moving average, not the last answer alone
    assert first < replica.seconds_per_token < 0.1


@pytest.mark.parametrize("payload, tokens", [
    ({"max_tokens": 64}, 64), ({"max_completion_tokens": 32}, 32), ({}, None), ({"max_tokens": None}, None),
    ({"max_tokens": True}, None), ({"max_tokens": "64"}, None), ({"max_tokens": 0}, None),
])
def test_the_tokens_a_request_asks_for(payload, tokens):
    assert asked_tokens(payload) == tokens


def test_the_gateway_times_each_answer_per_token_and_sends_long_requests_to_the_faster_replica():
    async def scenario() -> None:
        async def completions(request: web.Request) -> web.Response:
            body = await request.json()
            await asyncio.sleep(body["max_tokens"] * request.app["token_s"])
            return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                      "choices": [{"index": 0, "text": " x", "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": body["max_tokens"],
                                                "total_tokens": body["max_tokens"] + 1}})

        runners, routes = [], {}
        for index, token_s in enumerate((0.002, 0.008)):
            app = web.Application()
            app["token_s"] = token_s
            app.router.add_post("/v1/completions", completions)
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_ports(1)[0]
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
            routes[f"m/{index}"] = RouteFile(model="m", replica=f"m/{index}", url=f"http://127.0.0.1:{port}", node="n")
        pools = Pools(["m"], speed_aware=["m"])
        fast, slow = sorted(pools.apply(routes), key=lambda replica: replica.id)
        for replica in (fast, slow):
            pools.set_problem(replica, None)
        try:
            async with aiohttp.ClientSession() as session:
                state = SimpleNamespace(config=SimpleNamespace(models=["m"], max_n=16), keys=Keys(None, {}, []),
                                        pools=pools, client=session)

                def scope(path: str) -> dict:
                    return {"type": "http", "method": "POST", "path": path, "headers": [], "state": {}}

                for _ in range(40):  # one at a time: least outstanding ties, at random, until both answered
                    answer = await forward(state, scope("/v1/completions"), b'{"model": "m", "prompt": "x", "max_tokens": 10}')
                    assert answer.status_code == 200
                    if fast.seconds_per_token and slow.seconds_per_token:
                        break
                assert 0 < fast.seconds_per_token < slow.seconds_per_token
                # The guide's /generate is weighed by its max_tokens too (3 calls: well within STALE_CALLS, after
                # which the slow replica's speed would be forgotten and it timed again).
                for _ in range(3):
                    asked = scope("/generate")
                    answer = await generate(state, asked, b'{"prompt": "x", "max_tokens": 20}')
                    assert answer.status_code == 200 and asked["state"]["replica"] == fast.id
                asked = scope("/v1/chat/completions")  # a refusal (no messages) is answered at once and teaches nothing
                with pytest.raises(GatewayError):
                    await forward(state, asked, b'{"model": "m", "max_tokens": 10}')
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())


def test_a_model_without_a_healthy_replica_is_503_naming_each_problem():
    pools = Pools(["units-down", "units-none"])
    (replica,) = pools.apply({"units-down/0": _route("units-down", 0)})
    assert replica.state == "starting"  # not checked yet: not picked
    pools.set_problem(replica, "not reachable (ClientConnectorError)")
    for model, expected in (("units-down", "units-down/0 on node-0: not reachable (ClientConnectorError)"),
                            ("units-none", "no replica is routed")):
        with pytest.raises(GatewayError) as none:
            pools.pick(model)
        assert none.value.status == 503 and none.value.code == "model_unavailable"
        assert f"model '{model}'" in none.value.message and expected in none.value.message


def test_a_replica_whose_route_goes_drains_and_is_then_forgotten():
    pools, (old, kept) = _healthy_pools("units-drain", 2)
    old.begin()
    moved = _route("units-drain", 0, port=9100)  # the same id at a new address: a new replica
    (new,) = pools.apply({"units-drain/0": moved, "units-drain/1": kept.route})
    assert old.state == "draining" and pools.draining == [old] and new is not old
    pools.set_problem(new, None)
    assert {pools.pick("units-drain", avoid=kept) for _ in range(20)} == {new}  # never the draining one
    old.end()
    pools.forget_drained()
    assert pools.draining == []


def _write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text)


def test_route_files_are_read_when_the_directory_changes(tmp_path, caplog):
    files = RouteFiles(str(tmp_path / "routes"), ["m", "n"])
    with caplog.at_level("WARNING", logger="node_runtime.gateway"):
        assert files.changed() == {} and files.changed() is None  # no directory yet: no route, said once
    assert caplog.text.count("does not exist") == 1
    (tmp_path / "routes").mkdir()
    good = {"model": "m", "replica": "m/0", "url": "http://10.0.0.1:8100", "node": "w1"}
    _write(tmp_path / "routes", "m-0.json", json.dumps(good))
    _write(tmp_path / "routes", ".m-1.tmp", json.dumps({**good, "replica": "m/1"}))  # being written: not read
    assert set(files.changed()) == {"m/0"}
    assert files.changed() is None  # nothing changed: nothing read
    _write(tmp_path / "routes", "m-1.json", json.dumps({**good, "replica": "m/1", "url": "http://10.0.0.2:8100"}))
    routes = files.changed()
    assert set(routes) == {"m/0", "m/1"} and routes["m/1"].base_url == "http://10.0.0.2:8100"


@pytest.mark.parametrize("text, problem", [
    ('{"model": "m", "replica": "m/9", "url": "http://h:1"', "not valid JSON"),
    ('{"model": "m", "replica": "m/9", "url": "nope", "node": "w"}', "url: Input should be a valid URL"),
    ('{"model": "m", "replica": "m/9", "url": "http://h:1", "nodes": "w"}', "nodes: unknown field"),
    ('{"model": "x", "replica": "m/9", "url": "http://h:1", "node": "w"}', "model: 'x' is not one of the config's models (m)"),
    ('{"model": "m", "replica": "m/0", "url": "http://h:1", "node": "w"}', "replica: 'm/0' is already declared"),
])
def test_a_bad_route_file_is_logged_once_naming_the_file_and_field_and_ignored(tmp_path, caplog, text, problem):
    _write(tmp_path, "a-good.json", '{"model": "m", "replica": "m/0", "url": "http://h:1", "node": "w"}')
    _write(tmp_path, "bad.json", text)
    files = RouteFiles(str(tmp_path), ["m"])
    with caplog.at_level("WARNING", logger="node_runtime.gateway"):
        assert set(files.changed()) == {"m/0"}
        _write(tmp_path, "z-other.json", '{"model": "m", "replica": "m/5", "url": "http://h:5", "node": "w"}')
        assert set(files.changed()) == {"m/0", "m/5"}  # read again: bad.json unchanged, not logged again
    (line,) = [record.getMessage() for record in caplog.records]
    assert f"route file {tmp_path / 'bad.json'}" in line and problem in line and "ignored" in line


METRICS_WHILE_DRAINING = """# TYPE gateway_replica_routed gauge
gateway_replica_routed{model="m",replica="m/0"} 0.0
gateway_replica_routed{model="m",replica="m/1"} 2.0
# TYPE gateway_replica_in_flight gauge
gateway_replica_in_flight{model="m",replica="m/0"} 3.0
gateway_replica_in_flight{model="m",replica="m/1"} 1.0
"""


def test_replica_load_reads_the_summed_gauges():
    assert replica_load(METRICS_WHILE_DRAINING, "m/0") == (0.0, 3.0)
    assert replica_load(METRICS_WHILE_DRAINING, "m/1") == (2.0, 1.0)
    assert replica_load(METRICS_WHILE_DRAINING, "m/7") == (0.0, 0.0)  # never known: nothing to drain


def test_a_replica_leaves_after_unanswered_probes_in_a_row_and_at_once_when_refused_or_failing():
    async def scenario() -> None:
        answer = {"delay": 0.0, "status": 200}

        async def health(request: web.Request) -> web.Response:
            await asyncio.sleep(answer["delay"])
            return web.Response(status=answer["status"])

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        pools = Pools(["m"])
        [replica] = pools.apply({"m/0": RouteFile(model="m", replica="m/0", url=f"http://127.0.0.1:{port}", node="n")})
        async with aiohttp.ClientSession() as session:
            async def probe() -> str | None:
                await check_replicas(session, pools, [replica])
                return replica.problem

            assert await probe() is None
            answer["delay"] = CHECK_TIMEOUT.total + 0.5  # busy: answers, but late
            for _ in range(UNANSWERED_PROBES_TO_LEAVE - 1):
                assert await probe() is None and pools.pick("m") is replica
            assert await probe() == f"its /health did not answer within {CHECK_TIMEOUT.total:g} s"
            with pytest.raises(GatewayError):
                pools.pick("m")
            answer["delay"] = 0.0
            assert await probe() is None and replica.unanswered_probes == 0
            answer["status"] = 503
            assert await probe() == "its /health answered 503"
            answer["status"] = 200
            assert await probe() is None
            await runner.cleanup()
            assert (await probe()).startswith("not reachable")

    asyncio.run(scenario())
