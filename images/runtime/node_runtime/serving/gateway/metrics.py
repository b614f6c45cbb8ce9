"""The gateway's own Prometheus metrics, and the model servers' vllm:* metrics passed through."""

import functools
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

# Bounded labels only: endpoint from the route table (routes.py), model from the config's models.
NO_MODEL = "none"

REQUESTS = Counter("gateway_requests", "Requests answered, by endpoint, model and HTTP status", ["endpoint", "model", "status"])
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LATENCY = Histogram("gateway_request_duration_seconds", "Time to the last byte of the response", ["endpoint", "model"],
                    buckets=LATENCY_BUCKETS)
# livesum: with several workers, the sum over the live ones (ignored with one process).
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Requests being answered", ["endpoint"], multiprocess_mode="livesum")
# Per replica: labels from the route files, which the program keeps to a bounded set (a model's
# replicas by index). The gauges are what `node-runtime gateway drain` waits on, summed over workers.
UPSTREAM_REQUESTS = Counter("gateway_upstream_requests", "Calls to a replica, by its HTTP status (none: no answer)",
                            ["model", "replica", "status"])
UPSTREAM_ERRORS = Counter("gateway_upstream_errors", "Failed calls to a replica, by kind", ["model", "replica", "kind"])
# The per-replica side of LATENCY (p50/p99 per replica on the dashboard): a slow replica or node shows here.
UPSTREAM_LATENCY = Histogram("gateway_upstream_duration_seconds",
                             "Calls to a replica, from sending the request to the last byte of its answer (streams included)",
                             ["model", "replica"], buckets=LATENCY_BUCKETS)
REPLICA_IN_FLIGHT = Gauge("gateway_replica_in_flight", "Calls a replica is answering (streams until their end)",
                          ["model", "replica"], multiprocess_mode="livesum")
REPLICA_ROUTED = Gauge("gateway_replica_routed", "Gateway workers that may send the replica new requests (its route file is there)",
                       ["model", "replica"], multiprocess_mode="livesum")
# Per API key, by its name (never the secret): the config's names plus "default" and "none" (no key).
KEY_REQUESTS = Counter("gateway_key_requests", "Requests to the API endpoints by key name (none: without a key), "
                       "model and HTTP status", ["key", "model", "status"])
KEY_TOKENS = Counter("gateway_key_tokens", "Tokens of answered requests by key name and model; kind: prompt or completion",
                     ["key", "model", "kind"])
REPLICA_HEALTHY = Gauge("gateway_replica_healthy", "1 while the replica passes every worker's health probe",
                        ["model", "replica"], multiprocess_mode="livemin")


@functools.cache  # the labels are bounded, and .labels() is a locked lookup on every call
def _series(endpoint: str, model: str, status: int, key: str | None):
    """A request's series; `key`: the name of its API key, None on an endpoint that takes no key."""
    return (LATENCY.labels(endpoint, model), REQUESTS.labels(endpoint, model, str(status)),
            None if key is None else KEY_REQUESTS.labels(key, model, str(status)))


@functools.cache
def _key_tokens(key: str, model: str):
    return KEY_TOKENS.labels(key, model, "prompt"), KEY_TOKENS.labels(key, model, "completion")


class RequestMetricsMiddleware:
    """Plain ASGI middleware: counts a request once its response is fully sent (streams included).

    Only the `measured` paths are counted (routes.py leaves out /health and /metrics); handlers name
    the model they routed to in the scope's state.
    A request answered by nobody is counted with status 499 (nginx's "client closed request"): the
    gateway answers every error, so only a client that hung up first leaves one unanswered. A stream
    says how it really ended in the scope's state: 499 (its client left), 502 (its replica's answer was cut).
    Requests to the endpoints that take a key are counted per key too; `access_log` (access_log.py)
    writes a line for each request it samples.
    """

    def __init__(self, app, measured: set[str], access_log=None):
        self.app = app
        self.in_flight = {endpoint: IN_FLIGHT.labels(endpoint) for endpoint in measured}
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        in_flight = self.in_flight.get(scope["path"]) if scope["type"] == "http" else None
        if in_flight is None:
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"]
        status = None

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:
            status = status or 500  # the server (uvicorn, or Starlette's outer layer for a GET) answers it
            raise
        finally:
            in_flight.dec()
            state = scope.get("state", {})
            status, model, seconds = state.get("status", status or 499), state.get("model", NO_MODEL), time.perf_counter() - started
            key = state.get("key")  # keys.py notes it on the endpoints that take one
            latency, requests, key_requests = _series(endpoint, model, status, key and key.name)
            latency.observe(seconds)
            requests.inc()
            if key_requests is not None:
                key_requests.inc()
                if (usage := state.get("usage")) is not None:
                    prompt, completion = _key_tokens(key.name, model)
                    prompt.inc(usage[0])
                    completion.inc(usage[1])
            if self.access_log is not None:
                self.access_log.note(scope, endpoint, model, status, seconds)


class _Families:
    """What generate_latest needs: something with collect()."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return self._families


def relabel_vllm_metrics(texts: dict[tuple[str, str], str]) -> bytes:
    """Each replica's vllm:* families, merged by name, every sample labelled with the replica's model
    (served name) and replica: `texts` by (model, replica)."""
    merged = {}
    for (model, replica), text in texts.items():
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("vllm:"):
                continue
            target = merged.setdefault(family.name, family)
            samples = [sample._replace(labels={**sample.labels, "model": model, "replica": replica})
                       for sample in family.samples]
            if target is family:
                family.samples = samples
            else:
                target.samples.extend(samples)
    return generate_latest(_Families(list(merged.values())))


# prometheus_client's own switch: set, every process keeps its values in files there, read by whoever serves /metrics.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def shared_between_processes(enabled: bool):
    """With several gateway workers, their metrics in one fresh directory, removed when they are done.

    Set before the workers start (they inherit the environment) and before they import this module:
    prometheus_client picks its value store at import.
    """
    if not enabled:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as directory:
        os.environ[MULTIPROCESS_DIR_ENV] = directory
        try:
            yield
        finally:
            del os.environ[MULTIPROCESS_DIR_ENV]


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@contextmanager
def counted_worker():
    """A worker's life in the shared metrics: its in-flight values dropped when it ends (livesum sums
    live workers only; its counts stay). A worker that crashed could not drop its own: uvicorn starts
    a new one, which drops them."""
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if directory is None:
        yield
        return
    for live_values in Path(directory).glob("gauge_livesum_*.db"):
        pid = int(live_values.stem.rsplit("_", 1)[1])
        if _process_is_gone(pid):
            multiprocess.mark_process_dead(pid)
    try:
        yield
    finally:
        multiprocess.mark_process_dead(os.getpid())


def gateway_metrics() -> bytes:
    """Every worker's metrics summed when there are several; this process's otherwise."""
    if MULTIPROCESS_DIR_ENV not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
