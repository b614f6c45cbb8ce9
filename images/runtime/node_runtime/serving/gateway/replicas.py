"""Each served name's pool of replicas, and which one answers the next request.

A replica is in its model's pool while its route file is there (route_files.py) and its last health
check passed (health.py), or until a request finds it unreachable. Requests go to the replica with
the fewest of this worker's requests in flight, ties broken at random: the gateway's own counts
are exact and current, where vLLM's metrics lag (bench/gateway/RESULTS.md weighs this against
power of two choices).

For a model whose stack sets `balancing: speedAware` (replicas of unequal speed: mixed cards, a node
that also serves another model), once this worker has timed an answer from each replica of the pool,
a request that says how many tokens it may generate (max_tokens) also weighs how slow each replica
is: a replica slower than the fastest counts as busier by COST_WEIGHT x the extra time the request
would take there, in units of the fastest replica's time for a request of the usual length. Replicas within ALIKE_WITHIN of the
fastest count as equal and are picked as before (in an e2e run of three equal replicas, the measured
speeds' noise alone gave one replica 19% of the calls, the others 43 and 38%);
with one replica twice as slow, long requests stay off it unless the fast ones are clearly busier,
and the slowest answers (p99) are no longer its long ones (bench/gateway/RESULTS.md, "cost-aware").
Each replica's speed is learned from the answers this worker relays: seconds per requested token
(the call's duration over its max_tokens), a moving average; nothing is configured. A speed is
forgotten once it is older than STALE_CALLS usual calls of the fastest replica, and the pool is least
outstanding again until that replica has answered anew: a replica kept idle because it was slow
(its first answer cold, briefly overloaded) is timed again after a few calls' time, not judged by
its old answers. A fixed time would not do: in one e2e run a 30 s limit let a replica whose first
answers were slow get 98% of 300 requests, all within 4 s, while its equals sat idle.

It is not the default: speeds measured from answers are noisy where replicas compete for shared
resources, and the pick follows the noise. In the simulated cluster (three CPU engines on two
cores), five rounds of 300 requests gave 67/22/12, 29/46/26, 27/63/11, 4/52/44 and 47/21/32% of the
calls; least outstanding, on the same kind of cluster, 28-38% of the calls to each replica in every
round (tests/e2e asserts 20-47%).

A replica whose route file goes away is draining: it gets no new request, and is forgotten once
the requests it is answering (streams included) have ended.
"""

import random
import time
from operator import attrgetter
from typing import Callable

from node_runtime.serving.gateway.config import RouteFile
from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.metrics import (
    REPLICA_HEALTHY, REPLICA_IN_FLIGHT, REPLICA_ROUTED, UPSTREAM_ERRORS, UPSTREAM_LATENCY, UPSTREAM_REQUESTS,
)

NOT_PROBED = "not checked yet"
IN_FLIGHT = attrgetter("in_flight")  # least outstanding's score
# How much a replica's extra time for a request weighs against calls in flight (see the docstring);
# bench/gateway/balancing_policies.py measured 2-16: 4 keeps 97-99% of the throughput with one
# replica twice as slow, and changes nothing with equal replicas.
COST_WEIGHT = 4.0
# Speeds within this ratio of the fastest count as the fastest's: closer than that, per-token times
# differ by batch and prompt more than by replica.
ALIKE_WITHIN = 1.25
# Weight of the newest answer in a replica's seconds per token, and of the newest request in the
# usual number of tokens asked for.
SPEED_EWMA = 0.1
TOKENS_EWMA = 0.01
# A speed older than this many of the fastest replica's usual calls is forgotten (see the docstring).
STALE_CALLS = 16


class Replica:
    """One replica as this worker sees it: its route, its health, its calls in flight."""

    def __init__(self, route: RouteFile):
        self.route = route
        self.id, self.model, self.node, self.url = route.replica, route.model, route.node, route.base_url
        self.routed = True
        self.problem: str | None = NOT_PROBED  # None while healthy
        self.unanswered_probes = 0  # health probes in a row that timed out (gateway.health)
        self.in_flight = self.requests = self.errors = 0
        self.seconds_per_token: float | None = None  # learned from answered calls (measured); None: none yet
        self.speed_measured_at = 0.0  # time.monotonic() of the last answer that taught it
        self._in_flight = REPLICA_IN_FLIGHT.labels(self.model, self.id)
        self._latency = UPSTREAM_LATENCY.labels(self.model, self.id)
        self._answered = {}  # HTTP status -> its counter: .labels() is a locked lookup, this a dict get

    @property
    def state(self) -> str:
        if not self.routed:
            return "draining"
        if self.problem is None:
            return "healthy"
        return "starting" if self.problem == NOT_PROBED else "unhealthy"

    def begin(self) -> float:
        """A call to the replica starts; every begin() is matched by one end(), given what begin() returned."""
        self.in_flight += 1
        self.requests += 1
        self._in_flight.inc()
        return time.perf_counter()

    def end(self, started: float | None = None, tokens: int | None = None) -> None:
        """The call ended (answered to its last byte, or failed); its duration is measured from `started`
        (None: not timed, as in a simulation of the pools). `tokens`: the max_tokens of a call answered
        in full (status 200), whose duration then teaches this replica's speed; None for any other."""
        self.in_flight -= 1
        self._in_flight.dec()
        if started is not None:
            seconds = time.perf_counter() - started
            self._latency.observe(seconds)
            if tokens:
                self.measured(seconds, tokens)

    def measured(self, seconds: float, tokens: int) -> None:
        """A call asking for at most `tokens` tokens was answered in full in `seconds`."""
        per_token = seconds / tokens
        known = self.seconds_per_token
        self.seconds_per_token = per_token if known is None else known + SPEED_EWMA * (per_token - known)
        self.speed_measured_at = time.monotonic()

    def answered(self, status: int) -> None:
        counter = self._answered.get(status)
        if counter is None:
            counter = self._answered[status] = UPSTREAM_REQUESTS.labels(self.model, self.id, str(status))
        counter.inc()

    def failed(self, kind: str, *, answered: bool = True) -> None:
        """A call failed (`answered`: after the replica's status line, which answered() counted)."""
        self.errors += 1
        UPSTREAM_ERRORS.labels(self.model, self.id, kind).inc()
        if not answered:
            UPSTREAM_REQUESTS.labels(self.model, self.id, "none").inc()

    def describe(self) -> str:
        return f"{self.id} on {self.node}: {self.problem or 'healthy'}"


class Pools:
    """Every replica this worker knows, and per served name the healthy routed ones."""

    def __init__(self, models: list[str], speed_aware: list[str] = ()):
        self.models = models
        self.speed_aware = set(speed_aware)  # the models whose pick weighs speeds (see the docstring)
        self.replicas: dict[str, Replica] = {}  # routed, by replica id
        self.draining: list[Replica] = []
        self._healthy: dict[str, list[Replica]] = {model: [] for model in models}
        self._usual_tokens: dict[str, float] = {}  # per model: the max_tokens requests usually ask for
        self.cost_weight = COST_WEIGHT

    def pick(self, model: str, avoid: Replica | None = None, tokens: int | None = None) -> Replica:
        """The healthy replica of `model` with the fewest calls in flight (not `avoid`); 503 if none.

        `tokens`: the request's max_tokens, when it says: while every candidate's speed is known and
        recent, a slower replica counts as busier by the time the request would lose there (see the docstring)."""
        if tokens and model in self.speed_aware:
            usual = self._usual_tokens.get(model)
            usual = self._usual_tokens[model] = tokens if usual is None else usual + TOKENS_EWMA * (tokens - usual)
            if fastest := self._fastest_recent_speed(model, avoid, usual):
                return self._least(model, avoid, self._cost(self.cost_weight * tokens / (fastest * usual), fastest))
        best = self._least(model, avoid, IN_FLIGHT)
        if best is None:
            raise self._unavailable(model)
        return best

    def _least(self, model: str, avoid: Replica | None, score: Callable[[Replica], float]) -> Replica | None:
        """The candidate (a healthy replica of `model`, not `avoid`) with the least score, ties at random."""
        best, best_score, ties = None, 0.0, 0
        for replica in self._healthy[model]:
            if replica is avoid:
                continue
            value = score(replica)
            if best is None or value < best_score:
                best, best_score, ties = replica, value, 1
            elif value == best_score:
                ties += 1
                if random.random() * ties < 1:  # each of the tied replicas kept with chance 1/ties
                    best = replica
        return best

    def _fastest_recent_speed(self, model: str, avoid: Replica | None, usual: float) -> float | None:
        """The least seconds per token among the candidates if every one's is known and recent; else None,
        and the speeds older than STALE_CALLS of the fastest one's usual calls are forgotten."""
        fastest, newest = None, 0.0
        for replica in self._healthy[model]:
            if replica is avoid:
                continue
            if replica.seconds_per_token is None:
                return None
            if fastest is None or replica.seconds_per_token < fastest:
                fastest = replica.seconds_per_token
            newest = max(newest, replica.speed_measured_at)
        if not fastest:  # no candidate, or one timed at nothing
            return None
        oldest_trusted = newest - STALE_CALLS * fastest * usual
        recent = True
        for replica in self._healthy[model]:
            if replica is not avoid and replica.speed_measured_at < oldest_trusted:
                replica.seconds_per_token, recent = None, False
        return fastest if recent else None

    @staticmethod
    def _cost(weight: float, fastest: float) -> Callable[[Replica], float]:
        """A replica's in_flight + weight x (its seconds per token - the fastest's); a replica within
        ALIKE_WITHIN of the fastest adds nothing to its calls in flight."""
        alike = ALIKE_WITHIN * fastest

        def score(replica: Replica) -> float:
            slower = replica.seconds_per_token > alike
            return replica.in_flight + weight * (replica.seconds_per_token - fastest) if slower else replica.in_flight

        return score

    def _unavailable(self, model: str) -> GatewayError:
        replicas = self.routed(model)
        why = "; ".join(replica.describe() for replica in replicas) if replicas else "no replica is routed (no route file names it)"
        return GatewayError(503, f"model '{model}' has no healthy replica ({why}): see /health", param="model",
                            code="model_unavailable")

    def routed(self, model: str) -> list[Replica]:
        return sorted((replica for replica in self.replicas.values() if replica.model == model), key=lambda r: r.id)

    def apply(self, routes: dict[str, RouteFile]) -> list[Replica]:
        """Make the routed replicas those of `routes` (by replica id); returns the new ones, not yet checked."""
        for replica_id, replica in list(self.replicas.items()):
            if routes.get(replica_id) != replica.route:  # gone, or now elsewhere: a new replica under the same id
                del self.replicas[replica_id]
                replica.routed = False
                REPLICA_ROUTED.labels(replica.model, replica.id).set(0)
                self.draining.append(replica)
        added = []
        for replica_id, route in routes.items():
            if replica_id not in self.replicas:
                replica = self.replicas[replica_id] = Replica(route)
                REPLICA_ROUTED.labels(replica.model, replica.id).set(1)
                REPLICA_HEALTHY.labels(replica.model, replica.id).set(0)
                added.append(replica)
        self.forget_drained()
        self._refresh()
        return added

    def forget_drained(self) -> None:
        self.draining = [replica for replica in self.draining if replica.in_flight > 0]

    def set_problem(self, replica: Replica, problem: str | None) -> None:
        """A health check's (or a failed call's) verdict: None puts the replica in its pool, a problem takes it out."""
        if replica.problem == problem:
            return
        replica.problem = problem
        if replica.routed:
            REPLICA_HEALTHY.labels(replica.model, replica.id).set(problem is None)
        self._refresh()

    def _refresh(self) -> None:
        for model in self.models:
            self._healthy[model] = [r for r in self.routed(model) if r.problem is None]
