"""Which replica a request goes to: the gateway's choice (least outstanding, ties at random) against
power of two choices, round robin and random, in a simulation of the engines.

The gateway's own Pools.pick makes its choices; the others pick from the same in-flight counts.
Each engine has a fixed number of slots (its batch) and a time per token; requests beyond the
slots wait in FIFO order, as vLLM's scheduler queues what does not fit. Requests arrive at random
(Poisson) at a fraction of the engines' total capacity, each to one of W gateway workers at random
(the kernel spreads connections over uvicorn's workers), and each worker counts only its own calls
in flight, as the real ones do. Virtual time: no HTTP, no CPU limits, the policy alone is measured
(bench/routing/ measures the whole gateway in front of simulated engines over HTTP).

Run: .venv/bin/python -m bench.gateway.balancing_policies [--requests 40000] [--seeds 5]
"""

import heapq
import itertools
import random
import statistics
from collections import deque

from bench import harness
from node_runtime.serving.gateway.config import RouteFile
from node_runtime.serving.gateway.replicas import Pools

MODEL = "sim"


def power_of_two(pools: Pools, model: str):
    a, b = random.sample(pools.routed(model), 2)
    return a if a.in_flight < b.in_flight or (a.in_flight == b.in_flight and random.random() < 0.5) else b


def make_policies():
    turns = {}

    def round_robin(pools: Pools, model: str):
        turn = turns.setdefault(id(pools), itertools.count())
        replicas = pools.routed(model)
        return replicas[next(turn) % len(replicas)]

    return {
        "least outstanding, random ties (gateway)": lambda pools, model: pools.pick(model),
        "power of two choices": power_of_two,
        "round robin": round_robin,
        "random": lambda pools, model: random.choice(pools.routed(model)),
    }


def worker_pools(engines: int) -> Pools:
    pools = Pools([MODEL])
    routes = {f"{MODEL}/{i}": RouteFile(model=MODEL, replica=f"{MODEL}/{i}", url=f"http://10.0.0.{i + 1}:8100", node=f"n{i}")
              for i in range(engines)}
    for replica in pools.apply(routes):
        pools.set_problem(replica, None)
    return pools


def simulate(policy, token_s: list[float], slots: int, workers: int, load: float, requests: int, seed: int) -> list[float]:
    """Latencies (s) of `requests` requests: arrival to the end of their last token."""
    random.seed(seed)
    mean_tokens = 128
    capacity = sum(slots / (mean_tokens * t) for t in token_s)  # requests/s all engines together
    pools = [worker_pools(len(token_s)) for _ in range(workers)]
    index = {id(replica): int(replica.id.split("/")[1]) for p in pools for replica in p.routed(MODEL)}
    running, queued = [0] * len(token_s), [deque() for _ in token_s]
    events, latencies, now, sequence = [], [], 0.0, itertools.count()

    def start(engine: int, job) -> None:
        running[engine] += 1
        heapq.heappush(events, (now + job[2] * token_s[engine], next(sequence), "done", engine, job))

    for _ in range(requests):
        now += random.expovariate(load * capacity)
        heapq.heappush(events, (now, next(sequence), "arrive", None, None))
    now = 0.0
    while events:
        now, _, kind, engine, job = heapq.heappop(events)
        if kind == "arrive":
            replica = policy(random.choice(pools), MODEL)
            replica.begin()
            engine = index[id(replica)]
            job = (now, replica, random.randint(16, 240))  # tokens: uniform, mean 128
            if running[engine] < slots:
                start(engine, job)
            else:
                queued[engine].append(job)
        else:
            running[engine] -= 1
            job[1].end()
            latencies.append(now - job[0])
            if queued[engine]:
                start(engine, queued[engine].popleft())
    return latencies


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    scenarios = [
        ("4 engines alike", [0.02] * 4),
        ("4 engines, one twice as slow", [0.02, 0.02, 0.02, 0.04]),
        ("8 engines alike", [0.02] * 8),
    ]
    with harness.report():
        print(f"{args.requests} requests per run, median of {args.seeds} seeds; engines of 8 slots; latency p50 / p99 in s")
        for workers in (1, 2):
            for load in (0.7, 0.9):
                for name, token_s in scenarios:
                    print(f"\n{name}, {workers} gateway worker(s), load {load:.0%} of capacity")
                    for label, policy in make_policies().items():
                        runs = [simulate(policy, token_s, 8, workers, load, args.requests, seed) for seed in range(args.seeds)]
                        p50 = statistics.median(statistics.quantiles(run, n=100)[49] for run in runs)
                        p99 = statistics.median(statistics.quantiles(run, n=100)[98] for run in runs)
                        print(f"  {label:<42} p50 {p50:6.2f}  p99 {p99:6.2f}")


if __name__ == "__main__":
    main()
