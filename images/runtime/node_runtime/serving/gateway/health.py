"""What /health and / report: each model server's own /health, and the Ray cluster's state."""

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from node_runtime.serving.cluster import ClusterState, ClusterUnreachable, probe_async
from node_runtime.serving.gateway.upstream import HEALTH_TIMEOUT, base_url
from node_runtime.serving.spec import ClusterSpec, UpstreamServer


async def server_problem(session: aiohttp.ClientSession, server: UpstreamServer) -> str | None:
    """None when the server's own /health answers 200, else what is wrong."""
    try:
        async with session.get(base_url(server) + "/health", timeout=HEALTH_TIMEOUT) as response:
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return f"not reachable ({type(error).__name__})"
    return None if status == 200 else f"its /health answered {status}"


@dataclass(frozen=True)
class ClusterReport:
    state: ClusterState | None
    problem: str | None

    def as_json(self, spec: ClusterSpec) -> dict:
        return {
            "ray_address": spec.ray_address,
            "nodes_alive": self.state.nodes if self.state else None,
            "nodes_expected": spec.expected_nodes,
            "gpus": self.state.gpus if self.state else None,
            "gpus_expected": spec.expected_gpus,
            "problem": self.problem,
        }


class ClusterMonitor:
    """The Ray cluster's state, probed at most once per `ttl_s` however often /health is asked."""

    def __init__(self, spec: ClusterSpec, ttl_s: float = 10.0, probe_timeout_s: float = 20.0):
        self.spec = spec
        self.ttl_s = ttl_s
        self.probe_timeout_s = probe_timeout_s
        self._report: ClusterReport | None = None
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()

    async def report(self) -> ClusterReport:
        async with self._lock:
            if time.monotonic() - self._checked_at >= self.ttl_s:
                self._report = await self._probe()
                self._checked_at = time.monotonic()
            return self._report

    async def _probe(self) -> ClusterReport:
        try:
            state = await probe_async(self.spec.ray_address, self.probe_timeout_s)
        except ClusterUnreachable as error:
            return ClusterReport(None, str(error))
        return ClusterReport(state, state.shortfall(self.spec))
