"""What /health and / report, found in the background so that asking costs nothing: each replica's
own /health, checked every couple of seconds, and the Ray cluster's state, probed at most every
few seconds however often it is asked.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from node_runtime.serving.cluster import ClusterState, ClusterUnreachable, probe_async
from node_runtime.serving.gateway.replicas import Pools, Replica
from node_runtime.serving.spec import ClusterSpec

log = logging.getLogger("node_runtime.gateway")

CHECK_INTERVAL_S = 2.0
CHECK_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
# A replica busy generating may answer its /health late (a CPU engine on a loaded host took over 2 s):
# it leaves its pool only after this many probes in a row went unanswered, not at the first. Refused,
# reset or not 200 is a replica down or failing, and it leaves at once.
UNANSWERED_PROBES_TO_LEAVE = 3


class Unanswered(str):
    """A problem that is a probe's timeout: it counts towards UNANSWERED_PROBES_TO_LEAVE."""


async def replica_problem(session: aiohttp.ClientSession, url: str) -> str | None:
    """None when the replica's own /health answers 200, else what is wrong."""
    try:
        async with session.get(url + "/health", timeout=CHECK_TIMEOUT) as response:
            status = response.status
    except asyncio.TimeoutError:  # aiohttp's own timeouts are these too
        return Unanswered(f"its /health did not answer within {CHECK_TIMEOUT.total:g} s")
    except aiohttp.ClientError as error:
        return f"not reachable ({type(error).__name__})"
    return None if status == 200 else f"its /health answered {status}"


async def check_replicas(session: aiohttp.ClientSession, pools: Pools, replicas: list[Replica]) -> None:
    """Each replica's health checked at once; a failing one leaves its pool, a passing one (re)joins."""
    problems = await asyncio.gather(*(replica_problem(session, replica.url) for replica in replicas))
    for replica, problem in zip(replicas, problems):
        replica.unanswered_probes = replica.unanswered_probes + 1 if isinstance(problem, Unanswered) else 0
        if replica.problem is None and 0 < replica.unanswered_probes < UNANSWERED_PROBES_TO_LEAVE:
            continue
        pools.set_problem(replica, problem)


async def keep_checking(session: aiohttp.ClientSession, pools: Pools, now: asyncio.Event, interval_s: float) -> None:
    """Every `interval_s`, or at once when `now` is set (replicas were added), every routed replica."""
    while True:
        try:
            await asyncio.wait_for(now.wait(), interval_s)
        except asyncio.TimeoutError:
            pass
        now.clear()
        try:
            await check_replicas(session, pools, list(pools.replicas.values()))
        except Exception:  # noqa: BLE001 — a bug here must not stop the checks for good
            log.exception("checking the replicas' health failed")


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
