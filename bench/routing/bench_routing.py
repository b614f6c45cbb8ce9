"""Routing across replicas: our gateway against vLLM's own router, in front of N simulated engines, in one run.

Engines (sim_engine.py) speak vLLM's OpenAI API with a fixed number of slots and a fixed time per
token, so their capacity is known and the engines, not this machine's cores, are the limit. Replica
sets: N = 1, 2, 4, 8 uniform engines, and for N > 1 the same with one engine twice as slow (mixed).
Paths to the replicas, measured side by side:
  - direct: the load generator's clients split evenly over the engines (each gets its slots' worth):
    the measured sum of the replicas' capacities, the ideal no router can beat;
  - gateway: `node-runtime gateway` (its real CLI and config, one pool of replicas from a routes
    directory), least outstanding requests (the default);
  - gateway speedAware: the same with the model's `balancing: speedAware`: least outstanding weighed
    by each replica's measured speed against the request's max_tokens;
  - vllm-router power_of_two and round_robin: vLLM's router (`pip install vllm-router`, Rust);
  - gateway -> vllm-router power_of_two: the gateway with one replica, vllm-router, which balances:
    what balancing in vllm-router behind our gateway would cost (one more hop).
The gateway has no round-robin switch, and gets none for a benchmark: round robin is vllm-router's.
The load generator (loadgen.py) runs a closed loop of C clients (C = load × the replica set's slots)
over one fixed, seeded mix of requests (max_tokens uniform in a range, a share streamed). Every
round measures every replica set and every path, the order shifted each round so that drift on the
shared machine hits all alike. Reported per replica set and path: requests/s and tokens/s (median
over rounds; ratios to the computed capacity, to direct and to vllm-router taken round by round),
latency p50/p99 to the last byte (all rounds pooled), the router's CPU per request, how busy the
machine's cores were, and every error; then the issue's targets, met or not.

Run: .venv/bin/python -m bench.routing.bench_routing [--replicas 1,2,4,8] [--rounds 3] [--seconds 10]
     (vllm-router from PATH or --vllm-router; see bench/routing/README.md)
"""

import asyncio
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench import harness
from bench.gateway.bench_gateway import cpu_seconds, percentile
from bench.routing.loadgen import Outcome, closed_loop, request_mix
from tests.support.processes import (
    Process, free_ports, gateway_config, http_ok, metric_families, start_gateway, start_ray_head, write_route,
)

HERE = Path(__file__).resolve().parent

MODEL = "sim"
GATEWAY = "gateway"
SPEED_AWARE = "gateway speedAware"  # the model's balancing: speedAware
VLLM_ROUTER_POLICIES = ("power_of_two", "round_robin")
P2C = "vllm-router power_of_two"
TWO_HOPS = f"gateway -> {P2C}"  # the gateway with one replica: vllm-router, which balances
PATHS = ("direct", GATEWAY, SPEED_AWARE, *(f"vllm-router {policy}" for policy in VLLM_ROUTER_POLICIES), TWO_HOPS)
WIDTH = max(len(path) for path in PATHS)  # of the report's first column
SHORT = dict(zip(PATHS, ("direct", "gateway", "gw speedAware", "vr p2c", "vr rr", "gateway -> vr p2c")))  # the summary's columns


@dataclass(frozen=True)
class Engine:
    port: int
    slots: int
    token_ms: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Measured:
    outcomes: list[Outcome] = field(default_factory=list)  # one per round
    router_cpu_s: float = 0.0
    # per round, the share of one core used by: the load generator, the router, the engines; and the
    # share of all the machine's cores busy (everyone's processes, ours and the other engineers')
    loadgen: list[float] = field(default_factory=list)
    router: list[float] = field(default_factory=list)
    engines: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    served: list[int] = field(default_factory=list)  # requests each engine finished, all rounds, in the set's order


@dataclass
class ReplicaSet:
    speed: str  # "uniform" or "mixed"
    engines: list[Engine]
    clients: int
    routes: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)  # path -> (targets, its routers' pids)
    measured: dict[str, Measured] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{len(self.engines)} x {self.speed}"

    def capacity(self, mean_tokens: float) -> tuple[float, float]:
        """(requests/s, tokens/s) when every slot of every engine is always busy."""
        tokens_per_s = sum(engine.slots / (engine.token_ms / 1000) for engine in self.engines)
        return tokens_per_s / mean_tokens, tokens_per_s


def process_tree_cpu(pid: int) -> float:
    total = cpu_seconds(pid)
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += cpu_seconds(child.pid)
        except FileNotFoundError:  # a child that just ended
            pass
    return total


def finished(engine: Engine) -> int:
    """The engine's own count of requests it finished (vLLM's vllm:request_success_total)."""
    return int(sum(sample.value for sample in metric_families(engine.url)["vllm:request_success"].samples
                   if sample.name.endswith("_total")))


def machine_times() -> tuple[float, float]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def start_engines(engines: list[Engine], one_process_each: bool, work: Path) -> list[Process]:
    groups = [[engine] for engine in engines] if one_process_each else [engines]
    started = []
    for group in groups:
        argv = [sys.executable, str(HERE / "sim_engine.py"), "--model", MODEL]
        for engine in group:
            argv += ["--engine", f"{engine.port}:{engine.slots}:{engine.token_ms:g}"]
        process = Process(f"engines-{group[0].port}", argv, dict(os.environ), work)
        process.start()
        started.append(process)
        process.wait_until(lambda: all(http_ok(engine.url + "/health") for engine in group), 30)
    return started


def start_gateway_pool(urls: list[str], ray_address: str, work: Path, speed_aware: bool = False) -> tuple[Process, str]:
    """`node-runtime gateway` as the container runs it: one model, a route file per replica."""
    port = free_ports(1)[0]
    routes_dir = work / f"routes-{port}"
    routes_dir.mkdir()
    for replica, url in enumerate(urls):
        write_route(routes_dir, MODEL, f"{MODEL}-{replica}", url)
    config = {**gateway_config(port, [MODEL], routes_dir, ray_address), "speed_aware_models": [MODEL] if speed_aware else []}
    return start_gateway(config, work, api_key=None), f"http://127.0.0.1:{port}"


def start_vllm_router(binary: str, replica_set: ReplicaSet, policy: str, work: Path) -> tuple[Process, str]:
    port, metrics_port = free_ports(2)
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--worker-urls", *(engine.url for engine in replica_set.engines),
            "--prometheus-port", str(metrics_port), "--log-level", "warning", "--worker-startup-check-interval", "1"]
    router = Process(f"vllm-router-{policy}-{port}", argv, dict(os.environ), work)
    router.start()
    url = f"http://127.0.0.1:{port}"
    router.wait_until(lambda: http_ok(url + "/health"), 60)
    return router, url


def measure(replica_set: ReplicaSet, path: str, engine_pids: list[int], mix, args) -> None:
    targets, router_pids = replica_set.routes[path]
    measured = replica_set.measured.setdefault(path, Measured())

    def cpu() -> tuple[float, float, float, float, tuple[float, float]]:
        return (time.perf_counter(), time.process_time(), sum(process_tree_cpu(pid) for pid in router_pids),
                sum(cpu_seconds(engine) for engine in engine_pids), machine_times())

    served_before = [finished(engine) for engine in replica_set.engines]
    before = cpu()
    outcome = asyncio.run(closed_loop(targets, mix, replica_set.clients, args.warmup, args.seconds))
    after = cpu()
    served = [finished(engine) - count for engine, count in zip(replica_set.engines, served_before)]
    measured.served = [total + new for total, new in zip(measured.served, served)] if measured.served else served
    wall = after[0] - before[0]
    measured.outcomes.append(outcome)
    measured.loadgen.append((after[1] - before[1]) / wall)
    measured.router.append((after[2] - before[2]) / wall)
    measured.router_cpu_s += after[2] - before[2]
    measured.engines.append((after[3] - before[3]) / wall)
    measured.busy.append((after[4][0] - before[4][0]) / (after[4][1] - before[4][1]))


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def ratios(numerators: list[float], denominators: list[float]) -> tuple[float, list[float]]:
    per_round = [n / d for n, d in zip(numerators, denominators)]
    return statistics.median(per_round), per_round


@dataclass
class Headline:
    of_capacity: float  # tokens/s, median over rounds, over the computed capacity
    p50_ms: float
    p99_ms: float
    versus: dict[str, float]  # other path -> median of the per-round tokens/s ratios


def report(replica_set: ReplicaSet, mean_tokens: float) -> dict[str, Headline]:
    """Prints one replica set's measures; returns its headline figures by path."""
    capacity_rps, capacity_tps = replica_set.capacity(mean_tokens)
    speeds = sorted({engine.token_ms for engine in replica_set.engines})
    print(f"\n== {replica_set.label}: {len(replica_set.engines)} engines of {replica_set.engines[0].slots} slots at"
          f" {' / '.join(f'{s:g}' for s in speeds)} ms per token; {replica_set.clients} clients;"
          f" capacity {capacity_rps:.1f} req/s, {capacity_tps:.0f} tokens/s (computed)")
    headlines = {}
    tps_by_path = {path: [o.tps for o in m.outcomes] for path, m in replica_set.measured.items()}
    for path, measured in replica_set.measured.items():
        rps, tps = [o.rps for o in measured.outcomes], tps_by_path[path]
        latencies = [latency for outcome in measured.outcomes for latency in outcome.latencies]
        p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
        versus = {other: ratios(tps, tps_by_path[other]) for other in tps_by_path if other != path}
        headlines[path] = Headline(statistics.median(tps) / capacity_tps, p50, p99,
                                   {other: median for other, (median, _) in versus.items()})
        errors = sum((o.errors for o in measured.outcomes), start=Counter())
        sent = sum(o.sent for o in measured.outcomes)
        cpu = f"; router CPU {measured.router_cpu_s / sent * 1e6:.0f} us/request" if replica_set.routes[path][1] else ""
        print(f"{path:>{WIDTH}}: tokens/s median {statistics.median(tps):8.1f} per round {[round(t) for t in tps]},"
              f" {statistics.median(tps) / capacity_tps:.3f} of capacity; req/s median {statistics.median(rps):6.2f}"
              f" ({statistics.median(rps) / capacity_rps:.3f})")
        per_round = [round(percentile(outcome.latencies, 99) * 1000) for outcome in measured.outcomes]
        print(f"{'':>{WIDTH}}  latency p50 {p50:6.0f} ms, p99 {p99:6.0f} ms (per round {per_round}; {len(latencies)} answers){cpu};"
              f" errors {dict(errors) or 'none'}")
        if len(replica_set.engines) > 1:
            print(f"{'':>{WIDTH}}  share of the requests per engine (a mixed set's slow one first):"
                  f" {shares([count / sum(measured.served) for count in measured.served])}")
        print(f"{'':>{WIDTH}}  CPU per round, share of one core: load generator {shares(measured.loadgen)}, router"
              f" {shares(measured.router)}, engines {shares(measured.engines)}; all cores busy {shares(measured.busy)}")
        if path != "direct":
            for other, (median, per_round) in versus.items():
                print(f"{'':>{WIDTH}}  tokens/s vs {other}: median {median:.3f}, per round {[round(r, 3) for r in per_round]}")
    return headlines


def shares(values: list[float]) -> str:
    return "/".join(f"{value:.0%}" for value in values)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def summary(headlines: dict[tuple[int, str], dict[str, Headline]]) -> None:
    paths = [path for path in PATHS if any(path in by_path for by_path in headlines.values())]
    print("\n== summary: tokens/s as a share of the computed capacity | latency p50 / p99, ms; "
          + ", ".join(f"{SHORT[path]}: {path}" for path in paths if SHORT[path] != path))
    print(f"{'replicas':>12}" + "".join(f"{SHORT[path]:>24}" for path in paths))
    for (n, speed), by_path in headlines.items():
        cells = [f"{h.of_capacity:.3f} | {h.p50_ms:.0f} / {h.p99_ms:.0f}" if (h := by_path.get(path)) else "-" for path in paths]
        print(f"{f'{n} x {speed}':>12}" + "".join(f"{cell:>24}" for cell in cells))


def targets(headlines: dict[tuple[int, str], dict[str, Headline]], gateway_path: str) -> None:
    """The issue's targets for one of the gateway's paths, each with its figure."""
    print(f"\n== targets ({gateway_path}; throughput in tokens/s, ratios to vllm-router the medians of per-round ratios)")
    for (n, speed), by_path in headlines.items():
        gateway = by_path[gateway_path]
        routers = {path: ratio for path, ratio in gateway.versus.items() if path.startswith("vllm-router")}
        line = f"{f'{n} x {speed}':>12}: {gateway.of_capacity:.3f} of capacity (>= 0.95: {verdict(gateway.of_capacity >= 0.95)})"
        if routers:
            line += "; " + ", ".join(f"{ratio:.3f} of {path}" for path, ratio in routers.items())
            line += f" (>= 0.95: {verdict(min(routers.values()) >= 0.95)})"
        print(line)
    for (n, speed), by_path in headlines.items():
        uniform = headlines.get((n, "uniform"))
        if speed != "mixed" or uniform is None:
            continue
        gateway = by_path[gateway_path].p99_ms
        growth = gateway / uniform[gateway_path].p99_ms
        line = f"{f'{n} x mixed':>12}: p99 {gateway:.0f} ms, {growth:.2f} x uniform's (<= 1.2: {verdict(growth <= 1.2)};"
        line += " the others: " + ", ".join(f"{path} {by_path[path].p99_ms / uniform[path].p99_ms:.2f}"
                                           for path in by_path if path != gateway_path and path in uniform) + ")"
        routers = {path: gateway / h.p99_ms for path, h in by_path.items() if path.startswith("vllm-router")}
        if routers:
            line += "; " + ", ".join(f"{ratio:.2f} x {path}'s" for path, ratio in routers.items())
            line += f" (<= 1: {verdict(max(routers.values()) <= 1)})"
        print(line)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--replicas", default="1,2,4,8", help="replica counts, comma-separated")
    parser.add_argument("--slots", type=int, default=16, help="concurrent requests per engine")
    parser.add_argument("--token-ms", type=float, default=10, help="time per token of a uniform engine")
    parser.add_argument("--slow-factor", type=float, default=2, help="the mixed sets' slow engine: its time per token, times")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--stream-share", type=float, default=0.25, help="share of the requests streamed")
    parser.add_argument("--load", type=float, default=1.0, help="clients per engine slot")
    parser.add_argument("--seconds", type=float, default=10, help="measured window per path per round")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds before each window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"which of: {', '.join(PATHS)}")
    parser.add_argument("--engine-process-each", action="store_true",
                        help="one process per engine (default: one process hosts every engine)")
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"), help="the vllm-router executable")
    args = parser.parse_args()
    replica_counts = [int(n) for n in args.replicas.split(",")]
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(PATHS)}")
    if TWO_HOPS in paths and P2C not in paths:
        parser.error(f"--paths: {TWO_HOPS!r} needs {P2C!r}")
    if any("vllm-router" in p for p in paths) and not args.vllm_router:
        parser.error("vllm-router not found: install it (see bench/routing/README.md) and pass --vllm-router PATH,"
                     " or leave it out with --paths")

    mix = request_mix(MODEL, args.seed, 10_000, args.min_tokens, args.max_tokens, args.stream_share)
    mean_tokens = statistics.fmean(request.max_tokens for request in mix)
    fast_ports = free_ports(max(replica_counts) + 1)
    fast = [Engine(port, args.slots, args.token_ms) for port in fast_ports[:-1]]
    slow = Engine(fast_ports[-1], args.slots, args.token_ms * args.slow_factor)
    replica_sets = []
    for n in replica_counts:
        replica_sets.append(ReplicaSet("uniform", fast[:n], round(args.load * n * args.slots)))
        if n > 1:
            replica_sets.append(ReplicaSet("mixed", [slow, *fast[:n - 1]], round(args.load * n * args.slots)))

    with harness.report():
        with harness.helper_processes("nrr-") as work:
            engines = start_engines([*fast, slow], args.engine_process_each, work)
            ray_address = None
            if {GATEWAY, SPEED_AWARE, TWO_HOPS} & set(paths):
                _, ray_address = start_ray_head(work)
            for replica_set in replica_sets:
                for path in paths:
                    if P2C in path and len(replica_set.engines) == 1:
                        continue  # vllm-router refuses to start: "Power-of-two policy requires at least 2 workers"
                    if path == "direct":
                        replica_set.routes[path] = ([engine.url for engine in replica_set.engines], [])
                        continue
                    if path in (GATEWAY, SPEED_AWARE):
                        router, url = start_gateway_pool([engine.url for engine in replica_set.engines], ray_address, work,
                                                         speed_aware=path == SPEED_AWARE)
                    elif path == TWO_HOPS:
                        router, url = start_gateway_pool(replica_set.routes[P2C][0], ray_address, work)
                    else:
                        router, url = start_vllm_router(args.vllm_router, replica_set, path.split()[1], work)
                    pids = [router.proc.pid, *(replica_set.routes[P2C][1] if path == TWO_HOPS else [])]
                    replica_set.routes[path] = ([url], pids)
            for round_number in range(args.rounds):
                for replica_set in rotated(replica_sets, round_number):
                    for path in rotated(list(replica_set.routes), round_number):
                        measure(replica_set, path, [engine.proc.pid for engine in engines], mix, args)

        print(f"routing: {args.rounds} interleaved rounds of {args.warmup:g} s warm-up + {args.seconds:g} s measured per path;"
              f" {args.load:g} client(s) per slot; max_tokens uniform in [{args.min_tokens}, {args.max_tokens}]"
              f" (mean {mean_tokens:.1f}), {args.stream_share:.0%} streamed, seed {args.seed};"
              f" engines {'one process each' if args.engine_process_each else 'in one process'}")
        headlines = {(len(rs.engines), rs.speed): report(rs, mean_tokens) for rs in replica_sets}
        summary(headlines)
        for gateway_path in (GATEWAY, SPEED_AWARE):
            if all(gateway_path in by_path for by_path in headlines.values()):
                targets(headlines, gateway_path)

if __name__ == "__main__":
    main()
