"""What Prometheus scrapes in a stack, worked out from its plan (the `prometheusScrapeConfig` output).

Two jobs: the gateway's /metrics on the head (its own metrics and every replica's vllm:* metrics,
labelled with model and replica), and Ray's metrics export port on every node's cluster address.
Every series gets the stack's cluster name (the dashboard's `cluster` filter); Ray's also the node's
label. Not the gateway's: the replicas whose metrics it passes on run on any node. Pure: no Pulumi import.
"""

from __future__ import annotations

import yaml

from components.plan import Plan

HEADER = """\
# Prometheus scrape config for this stack (`pulumi stack output prometheusScrapeConfig`).
# Use it as prometheus.yml, or copy its scrape_configs entries into yours; monitoring/README.md
# has the dashboard that reads these series.
"""


def scrape_jobs(plan: Plan) -> list[dict]:
    """Prometheus `scrape_configs` entries: the gateway, then Ray on every node."""
    cluster = plan.config.cluster_name
    gateway = plan.gateway_url.removeprefix("http://")
    metrics_port = plan.config.ray_ports.metrics_export
    return [
        {"job_name": f"{cluster}-gateway", "metrics_path": "/metrics",
         "static_configs": [{"targets": [gateway], "labels": {"cluster": cluster}}]},
        {"job_name": f"{cluster}-ray", "metrics_path": "/metrics",
         "static_configs": [{"targets": [f"{node.cluster_address}:{metrics_port}"],
                             "labels": {"cluster": cluster, "node": node.label}} for node in plan.nodes]},
    ]


def prometheus_scrape_config(plan: Plan, scrape_interval: str = "15s") -> str:
    """A whole prometheus.yml (YAML text) scraping the stack every `scrape_interval`."""
    config = {"global": {"scrape_interval": scrape_interval}, "scrape_configs": scrape_jobs(plan)}
    return HEADER + yaml.safe_dump(config, sort_keys=False)
