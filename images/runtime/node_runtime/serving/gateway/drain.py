"""`node-runtime gateway drain`: wait until the gateway sends a replica nothing more.

The program removes a replica's route file, runs this, then removes the replica. It reads the
gateway's /metrics, which sums every worker: `gateway_replica_routed` (workers that may still send
the replica new requests: each notices the file gone within a poll) and `gateway_replica_in_flight`
(calls it is still answering, streams until their end).
"""

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROUTED = "gateway_replica_routed"
IN_FLIGHT = "gateway_replica_in_flight"


def replica_load(metrics: str, replica: str) -> tuple[float, float]:
    """(workers routing to `replica`, its calls in flight) in a /metrics text; (0, 0) if the gateway never knew it."""
    totals = {ROUTED: 0.0, IN_FLIGHT: 0.0}
    for family in text_string_to_metric_families(metrics):
        if family.name in totals:
            totals[family.name] += sum(sample.value for sample in family.samples if sample.labels.get("replica") == replica)
    return totals[ROUTED], totals[IN_FLIGHT]


def drain(replica: str, metrics_url: str, timeout_s: float, *, interval_s: float = 0.5,
          report: Callable[[str], None] = lambda line: None) -> str | None:
    """None once no worker routes to `replica` and nothing of it is in flight, or at once when the
    gateway is not reachable (nothing to drain); after `timeout_s`, what was still going on."""
    deadline = time.monotonic() + timeout_s
    last = "the gateway's /metrics never answered"
    while True:
        try:
            response = httpx.get(metrics_url, timeout=10)
            response.raise_for_status()
        except httpx.ConnectError as refused:
            report(f"gateway not reachable at {metrics_url} ({refused}): nothing to drain")
            return None
        except httpx.HTTPError as failed:  # a gateway there but not answering: it may still have calls in flight
            last = f"the gateway's /metrics failed ({type(failed).__name__}: {failed})"
        else:
            routed, in_flight = replica_load(response.text, replica)
            if routed == 0 and in_flight == 0:
                return None
            last = f"{in_flight:g} requests in flight, {routed:g} gateway workers still routing to it"
        if time.monotonic() >= deadline:
            return last
        time.sleep(interval_s)
