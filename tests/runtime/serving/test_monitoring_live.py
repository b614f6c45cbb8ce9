"""Every query of monitoring/grafana-dashboard.json, run through a real Prometheus scraping the real
gateway (in front of the session's vLLM, a replica that fails every call and one with vLLM 0.8.5's
metric names), vLLM through it, and Ray, with the scrape config the stack outputs: each must parse
and return data, so the dashboard cannot drift from the metric names the gateway, vLLM and Ray export."""

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from components.config import parse_stack_config
from components.monitoring import prometheus_scrape_config
from components.plan import make_plan
from tests.support.pulumi_program import REPO, stack_config

from .conftest import INTERNAL_KEY, MODEL_NAME
from tests.support.processes import Process, eventually, free_ports, gateway_config, http_ok, metric_families, start_gateway, write_route
from .upstreams import RawReplica, ShapedReplica

pytestmark = pytest.mark.slow

DASHBOARD_PATH = REPO / "monitoring" / "grafana-dashboard.json"
SCRAPE_INTERVAL_S = 2
# What Grafana puts for the dashboard's variables: "All" (allValue .*), and a rate window of at least
# four scrapes, here wide enough to hold the whole test's traffic.
VARIABLE_VALUES = {"cluster": ".*", "model": ".*", "replica": ".*", "__rate_interval": "2m"}
# Named API keys (name -> secret): the per-key panels must show the names, never the secrets.
KEYS = {"team-a": "team-a-test-secret", "team-b": "team-b-test-secret"}
KEY_POLICIES = [{"name": "team-a"}, {"name": "team-b", "requests_per_minute": 2}]  # team-b's third request: 429
KV_CACHE_PANEL = "KV-cache usage per replica"
LEGACY_MODEL = "vllm-0.8.5"


class Vllm085Replica(ShapedReplica):
    """A replica with vLLM 0.8.5's name for the KV-cache gauge, which 0.10 renamed vllm:kv_cache_usage_perc
    (the session's vLLM is 0.32): the dashboard must read both."""

    def metrics(self) -> bytes:
        return (b"# TYPE vllm:gpu_cache_usage_perc gauge\n"
                b'vllm:gpu_cache_usage_perc{engine="0",model_name="vllm-0.8.5"} 0.25\n')


def ray_metrics_port(ray_address: str) -> int:
    """The metrics export port of the session's one Ray node, as Ray itself reports it."""
    script = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
              "print(json.dumps([n['MetricsExportPort'] for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", script, ray_address], capture_output=True, text=True, timeout=120, check=True)
    (port,) = json.loads(done.stdout.strip().splitlines()[-1])
    return port


def stack_scrape_config(api_port: int, metrics_export_port: int) -> str:
    """The prometheusScrapeConfig output of the local stack (head 127.0.0.1) on this test's ports."""
    config = {**stack_config(REPO / "Pulumi.local.yaml"), "apiPort": api_port, "rayPorts": {"metricsExport": metrics_export_port}}
    return prometheus_scrape_config(make_plan(parse_stack_config(config)), scrape_interval=f"{SCRAPE_INTERVAL_S}s")


class Prometheus:
    def __init__(self, url: str, process: Process):
        self.url, self.process = url, process

    def query(self, promql: str) -> httpx.Response:
        return httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=30)

    def vector(self, promql: str) -> list[dict]:
        answer = self.query(promql)
        assert answer.status_code == 200 and answer.json()["status"] == "success", f"{promql}: {answer.text}"
        return answer.json()["data"]["result"]

    def targets(self) -> list[dict]:
        return httpx.get(self.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]


@contextmanager
def prometheus(config: str, work: Path) -> Iterator[Prometheus]:
    """Debian's prometheus on loopback, its data in `work`, stopped by its own process group."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: scripts/test.sh installs Debian's `prometheus` package"
    (work / "prometheus.yml").write_text(config)
    port = free_ports(1)[0]
    process = Process("prometheus", [
        binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], {"PATH": "/usr/bin:/bin"}, work)
    process.start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_until(lambda: http_ok(url + "/-/ready"), timeout=60)
        yield Prometheus(url, process)
    finally:
        process.stop()
        print(f"prometheus log:\n{process.tail(30)}")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every target of every panel."""
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    return [(panel["title"], target.get("legendFormat", ""), target["expr"])
            for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]]


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, label, PromQL) for each query variable's label_values(selector, label)."""
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]).groups()
            found.append((variable["name"], label, f"count by ({label}) ({selector})"))
    return found


def interpolate(query: str) -> str:
    """The query as Grafana sends it with every variable at "All"."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: VARIABLE_VALUES[m.group(1) or m.group(2)], query)


def dashboard_problems(server: Prometheus) -> list[str]:
    """Every variable's and every panel's query that does not run, returns no (finite) data, or drops a
    label its legend names."""
    problems = []
    for name, label, query in variable_queries():
        values = {series["metric"].get(label) for series in server.vector(interpolate(query))}
        if not values or None in values:
            problems.append(f"variable {name}: {query} gives no {label} values")
    for title, legend, query in dashboard_queries():
        answer = server.query(interpolate(query))
        if answer.status_code != 200:
            problems.append(f"{title}: {query} does not run: {answer.text}")
            continue
        result = answer.json()["data"]["result"]
        missing = {label for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend) for s in result if label not in s["metric"]}
        if not any(math.isfinite(float(s["value"][1])) for s in result):
            problems.append(f"{title}: {query} returns no finite value ({result})")
        elif missing:
            problems.append(f"{title}: legend {legend!r} names {missing}, which {query} does not keep")
    return problems


def drive_traffic(url: str) -> list[int]:
    """What the panels show: completions plain and streamed (the official client), the guide's endpoints,
    concurrent calls, requests the gateway refuses (404, 422), and a key over its limit (429). Calls that
    land on the failing replica are retried on vLLM's. Returns the statuses of the limited key's requests."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["team-a"], max_retries=0)

    def post(path: str, body: dict, key: str = "team-a") -> int:
        return httpx.post(url + path, json={"model": MODEL_NAME, **body}, headers={"Authorization": f"Bearer {KEYS[key]}"},
                          timeout=120).status_code

    for prompt in ("Hello, I am a", "The quick brown fox", "Ray schedules"):
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6)
        list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=6, stream=True))
    assert post("/generate", {"prompt": "metrics", "max_tokens": 4}) == 200
    assert post("/batch_generate", {"prompts": ["a", "b", "c"], "max_tokens": 4}) == 200
    at_once = [threading.Thread(target=client.completions.create,
                                kwargs={"model": MODEL_NAME, "prompt": "in flight", "max_tokens": 24}) for _ in range(4)]
    for thread in at_once:
        thread.start()
    for thread in at_once:
        thread.join(120)
    assert post("/generate", {"prompt": "x", "model": "gpt-9"}) == 404
    assert post("/generate", {"max_tokens": 5}) == 422
    return [post("/generate", {"prompt": "limited", "max_tokens": 2}, key="team-b") for _ in range(3)]


def test_every_dashboard_query_returns_data(model_server, ray_head, work_dir, tmp_path):
    failing, legacy = RawReplica("reset"), Vllm085Replica(LEGACY_MODEL)
    routes = tmp_path / "routes"
    routes.mkdir()
    write_route(routes, MODEL_NAME, f"{MODEL_NAME}/0", model_server.url)
    write_route(routes, MODEL_NAME, f"{MODEL_NAME}/1", failing.url, node="node-1")
    write_route(routes, LEGACY_MODEL, f"{LEGACY_MODEL}/0", legacy.url, node="node-1")
    port = free_ports(1)[0]
    config = {**gateway_config(port, [MODEL_NAME, LEGACY_MODEL], routes, ray_head, request_timeout_s=120),
              "api_keys": KEY_POLICIES}
    gateway = start_gateway(config, work_dir, api_key=None, internal_key=INTERNAL_KEY, api_keys=KEYS)
    url = f"http://127.0.0.1:{port}"
    try:
        ray_port = ray_metrics_port(ray_head)
        with prometheus(stack_scrape_config(port, ray_port), tmp_path) as server:
            expected = {"vllm-gateway": f"{url}/metrics", "vllm-ray": f"http://127.0.0.1:{ray_port}/metrics"}
            eventually(lambda: {t["labels"]["job"]: t["scrapeUrl"] for t in server.targets() if t["health"] == "up"} == expected,
                       timeout=60, what="the gateway and Ray scraped where the stack's config says")
            # Two rounds some scrapes apart, so every rate has an increase between two samples.
            limited = drive_traffic(url)
            time.sleep(4 * SCRAPE_INTERVAL_S)
            limited += drive_traffic(url)
            assert 429 in limited and set(limited) <= {200, 429}, limited
            answered = sum(s.value for s in metric_families(url)["gateway_requests"].samples if s.name == "gateway_requests_total")
            eventually(lambda: [s["value"][1] for s in server.vector("sum(gateway_requests_total)")] == [f"{answered:g}"],
                       timeout=30, what=f"Prometheus has scraped all {answered:g} requests")

            # A scrape that failed (a loaded machine) leaves a gauge stale until the next one: a query that
            # is right returns data again within a few scrapes, a wrong one never does.
            deadline = time.monotonic() + 15 * SCRAPE_INTERVAL_S
            while (problems := dashboard_problems(server)) and time.monotonic() < deadline:
                time.sleep(SCRAPE_INTERVAL_S)
            assert not problems, "\n".join(problems)

            # What a few panels must show of this traffic, beyond having data.
            by_title = {title: query for title, _, query in dashboard_queries()}
            failures = server.vector('sum by (replica) (gateway_upstream_errors_total{kind="unreachable"})')
            assert {s["metric"]["replica"] for s in failures} == {f"{MODEL_NAME}/1"}
            usage = {s["metric"]["replica"]: float(s["value"][1]) for s in server.vector(interpolate(by_title[KV_CACHE_PANEL]))}
            assert set(usage) == {f"{MODEL_NAME}/0", f"{LEGACY_MODEL}/0"} and usage[f"{LEGACY_MODEL}/0"] == 0.25
            key_errors = server.vector(interpolate(by_title["Errors/s per key by status"]))
            assert {(s["metric"]["key"], s["metric"]["status"]) for s in key_errors} >= {("team-b", "429"), ("team-a", "404")}
            names = set(httpx.get(server.url + "/api/v1/label/key/values", timeout=10).json()["data"])
            assert set(KEYS) <= names and not names & set(KEYS.values())
    finally:
        gateway.stop()
        failing.close()
        legacy.stop()
        print(f"gateway log:\n{gateway.tail(30)}")
