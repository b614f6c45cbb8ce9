"""Gateway overhead against direct calls to its model server, on two upstreams and two CPU placements, in one run.

Starts a Ray head, a tiny Llama on vLLM's CPU build (through `node-runtime serve`), two fixed-answer
servers speaking vLLM's OpenAI API (fixed_upstream.py), and one `node-runtime gateway` in front of
each. The three upstreams answer different questions:
  - fixed answer, at once: no engine, so the difference between the two paths is the gateway's own cost;
  - fixed answer after a delay (about vLLM's time per request here), using no CPU meanwhile: the
    gateway now idles between requests, as it does in front of vLLM, with nothing competing for CPU;
  - real vLLM: what a user sees.
And two CPU placements, switched between rounds by setting every thread's affinity:
  - shared: every process may run on every core. On this 2-core machine the engine, the gateway and
    the load generator then compete, so the gateway's CPU time is taken from the engine;
  - split: the engine side (vLLM, Ray, the fixed server) on the first half of the cores, the gateway
    and the load generator on the other half: a DCU server, where the engine's few CPU threads leave
    the gateway cores of its own. The engine gets the same cores on both paths.

Every measurement alternates the paths so that drift on the shared machine hits both alike:
  1. latency, one request at a time, direct and gateway alternating request by request (A/B/A/B),
     for /v1/completions (passed through) and /generate (translated; its direct counterpart is the
     same /v1/completions request), 1 token each: p50 and p99 added;
  2. throughput with concurrent clients for a fixed time, direct and gateway back to back (order
     swapped each round), for two workloads: /v1/completions of 1 token (the gateway's cost at its most visible) and the
     guide's own request to /generate (`{"prompt": "Hello, I am a", "max_tokens": 50}`, greedy so that
     both paths ask for the same tokens): the gateway/direct ratio per round, and its median, of
     requests/s and of completion tokens/s (which counts what vLLM generated, should the two paths'
     answers differ in length);
  3. the gateway process's CPU time per request it served;
  4. /batch_generate of B prompts vs a sequential loop of /generate (real vLLM, shared placement).

Run: .venv/bin/python -m bench.gateway.bench_gateway [--requests 300] [--seconds 5] [--rounds 4] [--concurrency 16]
"""

import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench import harness
from tests.support.processes import (
    Process, answers, cluster_json, free_ports, gateway_config, serve_spec, start_gateway, start_model_server, start_ray_head,
    write_route,
)
from tests.support.tiny_model import build_tiny_llama

MODEL = "bench-llama"
GUIDE_PROMPT = "Hello, I am a"
COMPLETION = {"model": MODEL, "prompt": GUIDE_PROMPT, "max_tokens": 1, "temperature": 0}
GENERATE = {"prompt": GUIDE_PROMPT, "max_tokens": 1, "temperature": 0}
GUIDE_REQUEST = {"prompt": GUIDE_PROMPT, "max_tokens": 50, "temperature": 0}
# (label, gateway path and body, direct path and body): the same work asked both ways.
LATENCY = [
    ("/v1/completions", ("/v1/completions", COMPLETION), ("/v1/completions", COMPLETION)),
    ("/generate", ("/generate", GENERATE), ("/v1/completions", COMPLETION)),
]
THROUGHPUT = [
    ("/v1/completions, 1 token", ("/v1/completions", COMPLETION), ("/v1/completions", COMPLETION)),
    ("/generate, guide's request", ("/generate", GUIDE_REQUEST), ("/v1/completions", {"model": MODEL, **GUIDE_REQUEST})),
]
PLACEMENTS = ("shared", "split")
ALL_CORES = sorted(os.sched_getaffinity(0))
JSON = {"content-type": "application/json"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pin(pid: int, cores: list[int], *, with_children: bool = True) -> None:
    """Every thread of the process (and of its descendants): affinity is per thread on Linux."""
    root = psutil.Process(pid)
    for process in [root, *(root.children(recursive=True) if with_children else [])]:
        try:
            threads = process.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            try:
                os.sched_setaffinity(thread.id, cores)
            except ProcessLookupError:  # a thread that just ended
                pass


@dataclass
class Measures:
    latency: dict = field(default_factory=lambda: defaultdict(lambda: {"direct": [], "gateway": []}))  # label -> seconds
    rps: dict = field(default_factory=lambda: defaultdict(lambda: {"direct": [], "gateway": []}))  # label -> req/s per round
    tps: dict = field(default_factory=lambda: defaultdict(lambda: {"direct": [], "gateway": []}))  # label -> tokens/s per round
    gateway_requests: int = 0
    gateway_cpu_s: float = 0.0


@dataclass
class Upstream:
    name: str
    short: str
    direct: str
    gateway: str
    gateway_pid: int
    engine_pids: list[int]
    measures: dict = field(default_factory=lambda: defaultdict(Measures))  # placement -> Measures


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """The completion tokens a JSON answer reports (0 for a stream)."""
    async with session.post(url, data=body, headers=JSON) as response:
        content = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
        if response.content_type != "application/json":
            return 0
    return json.loads(content)["usage"]["completion_tokens"]


async def timed_in_rotation(session: aiohttp.ClientSession, targets: dict[str, tuple[str, bytes]],
                            count: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per request for each (url, body) target, asked one at a time in rotation (A/B, B/A, ...
    or A/B/C, B/C/A, ...) so that drift on a shared machine hits all alike; warm-up rounds not kept."""
    order = list(targets)
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(warmup + count):
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            started = time.perf_counter()
            await post(session, *targets[name])
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


async def latency_round(upstream: Upstream, measures: Measures, count: int, warmup: int) -> None:
    cpu_before = cpu_seconds(upstream.gateway_pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for label, (gateway_path, gateway_body), (direct_path, direct_body) in LATENCY:
            targets = {"gateway": (upstream.gateway + gateway_path, json.dumps(gateway_body).encode()),
                       "direct": (upstream.direct + direct_path, json.dumps(direct_body).encode())}
            for path, seconds in (await timed_in_rotation(session, targets, count, warmup)).items():
                measures.latency[label][path] += seconds
            measures.gateway_requests += warmup + count
    measures.gateway_cpu_s += cpu_seconds(upstream.gateway_pid) - cpu_before


async def requests_per_second(url: str, body: bytes, seconds: float, concurrency: int) -> tuple[float, float, int]:
    """(completed requests per second, completion tokens per second, requests sent in all, warm-up included)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(post(session, url, body) for _ in range(concurrency)))
        done = tokens = 0

        async def worker(deadline: float):
            nonlocal done, tokens
            while time.perf_counter() < deadline:
                tokens += await post(session, url, body)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        return done / elapsed, tokens / elapsed, done + concurrency


def throughput_round(upstream: Upstream, measures: Measures, seconds: float, concurrency: int, swap: bool) -> None:
    for label, (gateway_path, gateway_body), (direct_path, direct_body) in THROUGHPUT:
        for path in (("gateway", "direct") if swap else ("direct", "gateway")):
            url, body = ((upstream.gateway + gateway_path, gateway_body) if path == "gateway"
                         else (upstream.direct + direct_path, direct_body))
            cpu_before = cpu_seconds(upstream.gateway_pid)
            rps, tps, sent = asyncio.run(requests_per_second(url, json.dumps(body).encode(), seconds, concurrency))
            measures.rps[label][path].append(rps)
            measures.tps[label][path].append(tps)
            if path == "gateway":
                measures.gateway_cpu_s += cpu_seconds(upstream.gateway_pid) - cpu_before
                measures.gateway_requests += sent


def place(placement: str, upstreams: list[Upstream]) -> None:
    half = max(1, len(ALL_CORES) // 2)
    engine_cores, front_cores = (ALL_CORES, ALL_CORES) if placement == "shared" else (ALL_CORES[:half], ALL_CORES[half:])
    for upstream in upstreams:
        for pid in upstream.engine_pids:
            pin(pid, engine_cores)
        pin(upstream.gateway_pid, front_cores)
    pin(os.getpid(), front_cores, with_children=False)  # the load generator: this process


async def batch_vs_loop(gateway: str, batch: int, rounds: int) -> tuple[float, float]:
    prompts = [f"Prompt number {i}: the quick brown fox" for i in range(batch)]
    sampling = {"max_tokens": 16, "temperature": 0}
    batch_times, loop_times = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            started = time.perf_counter()
            await post(session, gateway + "/batch_generate", json.dumps({"prompts": prompts, **sampling}).encode())
            batch_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            for prompt in prompts:
                await post(session, gateway + "/generate", json.dumps({"prompt": prompt, **sampling}).encode())
            loop_times.append(time.perf_counter() - started)
    return statistics.median(batch_times), statistics.median(loop_times)


@dataclass
class TinyVllm:
    head: Process
    ray_address: str
    server: Process
    url: str

    @property
    def engine_pids(self) -> list[int]:
        return [self.server.proc.pid, self.head.proc.pid]


def start_tiny_vllm(work: Path) -> TinyVllm:
    """A Ray head and a tiny Llama on vLLM's CPU build through `node-runtime serve`."""
    from node_runtime.modelstore.manifest import write_manifest

    model_dir = build_tiny_llama(work / "models" / MODEL)
    write_manifest(model_dir, source="local", repo_id=f"bench/{MODEL}", revision="bench")
    head, ray_address = start_ray_head(work)
    spec = serve_spec(model_dir, MODEL, free_ports(1)[0], ray_address, max_num_seqs=64)
    server = start_model_server(spec, work)
    return TinyVllm(head, ray_address, server, f"http://127.0.0.1:{spec['port']}")


def start_fixed_upstream(work: Path, delay_ms: float = 0) -> tuple[Process, str]:
    port = free_ports(1)[0]
    server = Process(f"fixed-{port}", [sys.executable, str(Path(__file__).with_name("fixed_upstream.py")), str(port), str(delay_ms)],
                     dict(os.environ), work)
    server.start()
    url = f"http://127.0.0.1:{port}"
    server.wait_until(lambda: answers(url + "/health"), 30)
    return server, url


def gateway_in_front(upstream_url: str, ray_address: str, work: Path, max_batch: int, workers: int = 1,
                     *, route_files: bool = True, extra: dict | None = None) -> tuple[Process, str]:
    """`node-runtime gateway` exactly as the container runs it (its CLI and its config), the upstream its
    model's one replica. `route_files=False`: the config of gateways before route files (for compare_versions.py);
    `extra`: more config keys."""
    port = free_ports(1)[0]
    options = {"max_batch_size": max_batch, "request_timeout_s": 300, "workers": workers, **(extra or {})}
    if route_files:
        routes = work / f"routes-{port}"
        routes.mkdir()
        write_route(routes, MODEL, f"{MODEL}/0", upstream_url)
        config = gateway_config(port, [MODEL], routes, ray_address, **options)
    else:
        config = {"host": "127.0.0.1", "port": port, "servers": [{"name": MODEL, "url": upstream_url}],
                  "cluster": cluster_json(ray_address), **options}
    return start_gateway(config, work, api_key=None), f"http://127.0.0.1:{port}"


def report(upstream: Upstream, placement: str, measures: Measures, args) -> dict:
    """Prints one upstream × placement; returns its headline figures."""
    ms = 1000
    headline = {}
    print(f"\n== upstream: {upstream.name}; placement: {placement}")
    for label, times in measures.latency.items():
        direct, gateway = times["direct"], times["gateway"]
        for q in (50, 99):
            d, g = percentile(direct, q) * ms, percentile(gateway, q) * ms
            print(f"latency {label:<16} p{q}  direct {d:7.3f} ms  gateway {g:7.3f} ms  -> added {g - d:6.3f} ms"
                  f"   ({len(direct)} requests per path)")
            headline[f"{label} p{q} added ms"] = g - d
        per_round = [
            (percentile(gateway[i:i + args.requests], 50) - percentile(direct[i:i + args.requests], 50)) * ms
            for i in range(0, len(direct), args.requests)
        ]
        print(f"        {label:<16} p50 added per round: {[round(x, 3) for x in per_round]}")
    for label, rps in measures.rps.items():
        ratios = [g / d for d, g in zip(rps["direct"], rps["gateway"])]
        tps = measures.tps[label]
        token_ratios = [g / d for d, g in zip(tps["direct"], tps["gateway"])]
        headline[f"req/s ratio, {label}"] = statistics.median(ratios)
        headline[f"tokens/s ratio, {label}"] = statistics.median(token_ratios)
        print(f"throughput {label}, {args.concurrency} clients, {args.seconds:g} s per path per round:"
              f" gateway/direct median {statistics.median(ratios):.3f}, per round {[round(r, 3) for r in ratios]}")
        print(f"        req/s direct {[round(r, 1) for r in rps['direct']]}, gateway {[round(r, 1) for r in rps['gateway']]}")
        print(f"        tokens/s gateway/direct median {statistics.median(token_ratios):.3f},"
              f" per round {[round(r, 3) for r in token_ratios]}")
    cpu_us = measures.gateway_cpu_s / measures.gateway_requests * 1e6
    headline["gateway CPU us/request"] = cpu_us
    print(f"gateway CPU time per request served: {cpu_us:.0f} us ({measures.gateway_requests} requests)")
    return headline


def summary(headlines: dict[tuple[str, str], dict]) -> None:
    columns = list(headlines)
    print("\n== summary (medians; targets: throughput ratio >= 0.95, p50 added <= 0.5 ms)")
    print(f"{'':46}" + "".join(f"{short + ', ' + placement:>20}" for short, placement in columns))
    for key in headlines[columns[0]]:
        print(f"{key:46}" + "".join(f"{headlines[column][key]:20.3f}" for column in columns))


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--requests", type=int, default=300, help="latency: requests per path and endpoint per round")
    parser.add_argument("--seconds", type=float, default=5, help="throughput: seconds per path and workload per round")
    parser.add_argument("--delay-ms", type=float, default=7, help="the delayed fixed upstream's wait (about vLLM's latency here)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests per path before each latency round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if len(ALL_CORES) < 2:
        parser.error("the split placement needs at least 2 cores")

    with harness.report():
        with harness.helper_processes("nrb-") as work:
            vllm = start_tiny_vllm(work)
            fixed, fixed_url = start_fixed_upstream(work)
            delayed, delayed_url = start_fixed_upstream(work, args.delay_ms)
            upstreams = []
            for name, short, url, engine in (
                ("fixed answer at once (the gateway's own cost)", "fixed", fixed_url, [fixed.proc.pid]),
                (f"fixed answer after {args.delay_ms:g} ms (an idle gateway's cost)", "delayed", delayed_url, [delayed.proc.pid]),
                ("real vLLM CPU", "vLLM", vllm.url, vllm.engine_pids),
            ):
                gateway, gateway_url = gateway_in_front(url, vllm.ray_address, work, max(64, args.batch))
                upstreams.append(Upstream(name, short, url, gateway_url, gateway.proc.pid, engine))

            for round_number in range(args.rounds):
                swap = bool(round_number % 2)
                for placement in (reversed(PLACEMENTS) if swap else PLACEMENTS):
                    place(placement, upstreams)
                    for upstream in (reversed(upstreams) if swap else upstreams):
                        measures = upstream.measures[placement]
                        asyncio.run(latency_round(upstream, measures, args.requests, args.warmup))
                        throughput_round(upstream, measures, args.seconds, args.concurrency, swap)
            place("shared", upstreams)
            batch_s, loop_s = asyncio.run(batch_vs_loop(upstreams[-1].gateway, args.batch, args.rounds))

        print(f"gateway vs direct, {args.rounds} interleaved rounds, cores {ALL_CORES}")
        headlines = {}
        for upstream in upstreams:
            for placement in PLACEMENTS:
                headlines[(upstream.short, placement)] = report(upstream, placement, upstream.measures[placement], args)
        summary(headlines)
        print(f"\n/batch_generate of {args.batch} prompts (16 tokens each) {batch_s:.2f} s vs sequential /generate loop"
              f" {loop_s:.2f} s -> {loop_s / batch_s:.1f}x faster")


if __name__ == "__main__":
    main()
