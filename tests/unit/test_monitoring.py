"""monitoring/: the Grafana dashboard's structure (Grafana's classic dashboard model, importable as is)
and the Prometheus scrape config the stack outputs. tests/runtime/serving/test_monitoring_live.py runs
every query of the dashboard against a real Prometheus scraping the real gateway, vLLM and Ray."""

import json
import re

import pytest
import yaml

from components.config import parse_stack_config
from components.monitoring import prometheus_scrape_config, scrape_jobs
from components.plan import make_plan
from tests.support.pulumi_program import REPO, run_program

DASHBOARD_PATH = REPO / "monitoring" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables a query may use ($__rate_interval: at least four scrape intervals).
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
GRID_COLUMNS = 24


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicated = {key for key in keys if keys.count(key) > 1}
    assert not duplicated, f"duplicate keys {duplicated}: Grafana would keep only the last"
    return dict(pairs)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text(), object_pairs_hook=_no_duplicate_keys)


def query_panels(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def used_variables(text: str) -> set[str]:
    """$name and ${name} references in a query (Grafana's two plain forms)."""
    return {a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", text)}


def test_the_dashboard_has_the_fields_grafana_requires(dashboard):
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,40}", dashboard["uid"])  # Grafana: up to 40 characters
    # 36 and later: panels reference data sources as {type, uid} objects, which is what this one does.
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # Grafana gives one on import
    assert {"from", "to"} <= set(dashboard["time"]) and isinstance(dashboard["templating"]["list"], list)
    assert isinstance(dashboard["panels"], list) and query_panels(dashboard)


def test_panel_ids_are_unique_and_the_grid_has_no_overlap(dashboard):
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] >= 1 and 1 <= grid["w"] and 0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_rows_hold_no_queries(dashboard):
    for row in (panel for panel in dashboard["panels"] if panel["type"] == "row"):
        assert row["gridPos"]["w"] == GRID_COLUMNS and row["gridPos"]["h"] == 1
        assert "targets" not in row and row["panels"] == [] and row["collapsed"] is False


def test_every_query_reads_the_chosen_prometheus(dashboard):
    (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (source["name"], source["query"]) == ("datasource", "prometheus")
    for panel in query_panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_every_variable_a_query_uses_is_defined(dashboard):
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    texts = [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]
    texts += [variable["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    for text in texts:
        assert used_variables(text) <= defined | GRAFANA_VARIABLES, text
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # "All" must be a regex every value matches, labels missing included
            assert variable["includeAll"] and variable["allValue"] == ".*", variable["name"]
            assert re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]), variable["query"]


def test_the_issues_panels_are_there(dashboard):
    """Issue 15: requests/s, p50/p99 latency and TTFT per model and replica, tokens/s, in flight, errors by
    status, vLLM's KV cache and queue, per-key usage."""
    exprs = " ".join(target["expr"] for panel in query_panels(dashboard) for target in panel["targets"])
    for metric in ("gateway_requests_total", "gateway_upstream_requests_total", "gateway_request_duration_seconds_bucket",
                   "gateway_upstream_duration_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:generation_tokens_total", "gateway_requests_in_flight", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "gateway_key_requests_total",
                   "gateway_key_tokens_total", "ray_node_cpu_utilization"):
        assert metric in exprs, metric
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


# The scrape config.

def _plan(config: dict):
    return make_plan(parse_stack_config(config))


def _targets(jobs: list[dict], job: str) -> list[tuple[str, dict]]:
    (found,) = [j for j in jobs if j["job_name"] == job]
    return [(target, group["labels"]) for group in found["static_configs"] for target in group["targets"]]


def test_the_dev_stack_is_scraped_at_the_gateway_and_every_ray_node(dev_config):
    jobs = scrape_jobs(_plan(dev_config))
    assert [job["job_name"] for job in jobs] == ["vllm-gateway", "vllm-ray"]
    assert all(job["metrics_path"] == "/metrics" for job in jobs)
    assert _targets(jobs, "vllm-gateway") == [("10.0.0.11:8000", {"cluster": "vllm"})]
    assert _targets(jobs, "vllm-ray") == [
        ("10.0.0.11:8090", {"cluster": "vllm", "node": "dcu-head"}),
        ("10.0.0.12:8090", {"cluster": "vllm", "node": "dcu-worker-1"}),
        ("10.0.0.13:8090", {"cluster": "vllm", "node": "dcu-worker-2"}),
    ]


def test_ray_is_scraped_on_the_cluster_address_the_gateway_where_clients_reach_it(dev_config):
    dev_config["head"]["clusterAddress"] = "192.168.50.11"
    dev_config["workers"][1]["clusterAddress"] = "192.168.50.13"
    dev_config.update(clusterName="prod", apiPort=9000, rayPorts={"metricsExport": 9100})
    jobs = scrape_jobs(_plan(dev_config))
    assert _targets(jobs, "prod-gateway") == [("10.0.0.11:9000", {"cluster": "prod"})]
    assert [target for target, _ in _targets(jobs, "prod-ray")] == ["192.168.50.11:9100", "10.0.0.12:9100", "192.168.50.13:9100"]


def test_a_gateway_bound_to_one_address_is_scraped_there(local_config):
    assert local_config["apiBindAddress"] == "127.0.0.1"
    jobs = scrape_jobs(_plan(local_config))
    assert _targets(jobs, "vllm-gateway") == [("127.0.0.1:8000", {"cluster": "vllm"})]
    assert _targets(jobs, "vllm-ray") == [("127.0.0.1:8090", {"cluster": "vllm", "node": "local"})]


def test_the_scrape_config_is_a_whole_prometheus_yml(dev_config):
    plan = _plan(dev_config)
    text = prometheus_scrape_config(plan, scrape_interval="5s")
    assert text.startswith("# Prometheus scrape config for this stack")
    assert yaml.safe_load(text) == {"global": {"scrape_interval": "5s"}, "scrape_configs": scrape_jobs(plan)}


def test_the_stack_outputs_it(dev_config):
    run = run_program(dev_config, stack="dev", secrets={"sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nkey\n"})
    assert run.error is None, run.error
    assert run.outputs["prometheusScrapeConfig"] == prometheus_scrape_config(_plan(dev_config))
