"""Gateway overhead against direct vLLM, on the same engine, in one run.

Starts a Ray head, a tiny Llama on vLLM's CPU build (through `node-runtime serve`) and the gateway
(`node-runtime gateway`), then measures, alternating the two paths so drift hits both alike:
  1. latency, one request at a time: p50/p99 of direct vs gateway (/v1/completions, max_tokens=1);
  2. throughput with concurrent clients: requests/s direct vs gateway;
  3. /batch_generate of B prompts vs a sequential loop of /generate over the same prompts.

Run: .venv/bin/python bench/gateway/bench_gateway.py [--requests 400] [--concurrency 16] [--batch 16]
"""

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.runtime.serving.processes import (  # noqa: E402
    cluster_json, free_ports, serve_spec, start_gateway, start_model_server, start_ray_head,
)
from tests.runtime.serving.tiny_model import build_tiny_llama  # noqa: E402

MODEL = "bench-llama"
BODY = {"model": MODEL, "prompt": "Hello, I am a", "max_tokens": 1, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def latency_pairs(direct: str, gateway: str, count: int) -> tuple[list[float], list[float]]:
    times = {direct: [], gateway: []}
    with httpx.Client(timeout=60) as client:
        for base in (direct, gateway):  # warm both paths and their connections
            for _ in range(20):
                client.post(base + "/v1/completions", json=BODY).raise_for_status()
        for i in range(count):
            for base in ((direct, gateway) if i % 2 else (gateway, direct)):
                started = time.perf_counter()
                client.post(base + "/v1/completions", json=BODY).raise_for_status()
                times[base].append(time.perf_counter() - started)
    return times[direct], times[gateway]


async def requests_per_second(base: str, count: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        queue = iter(range(count))

        async def worker():
            for _ in queue:
                (await client.post(base + "/v1/completions", json=BODY)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def batch_vs_loop(gateway: str, batch: int, rounds: int) -> tuple[float, float]:
    prompts = [f"Prompt number {i}: the quick brown fox" for i in range(batch)]
    sampling = {"max_tokens": 16, "temperature": 0}
    batch_times, loop_times = [], []
    with httpx.Client(timeout=300) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            client.post(gateway + "/batch_generate", json={"prompts": prompts, **sampling}).raise_for_status()
            batch_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            for prompt in prompts:
                client.post(gateway + "/generate", json={"prompt": prompt, **sampling}).raise_for_status()
            loop_times.append(time.perf_counter() - started)
    return statistics.median(batch_times), statistics.median(loop_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per path for latency and per throughput round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nrb-"))
    started = []
    try:
        from node_runtime.modelstore.manifest import write_manifest

        model_dir = build_tiny_llama(work / "models" / MODEL)
        write_manifest(model_dir, source="local", repo_id=f"bench/{MODEL}", revision="bench")
        head, ray_address = start_ray_head(work)
        started.append(head)
        spec = serve_spec(model_dir, MODEL, free_ports(1)[0], ray_address, max_num_seqs=64)
        started.append(start_model_server(spec, work))
        direct = f"http://127.0.0.1:{spec['port']}"
        port = free_ports(1)[0]
        config = {"host": "127.0.0.1", "port": port, "servers": [{"name": MODEL, "url": direct}],
                  "cluster": cluster_json(ray_address), "max_batch_size": max(64, args.batch), "request_timeout_s": 300}
        started.append(start_gateway(config, work, api_key=None))
        gateway = f"http://127.0.0.1:{port}"

        direct_s, gateway_s = latency_pairs(direct, gateway, args.requests)
        rps = {direct: [], gateway: []}
        for _ in range(args.rounds):
            for base in (direct, gateway):
                rps[base].append(asyncio.run(requests_per_second(base, args.requests, args.concurrency)))
        batch_s, loop_s = batch_vs_loop(gateway, args.batch, args.rounds)
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)

    ms = 1000
    direct_rps, gateway_rps = statistics.median(rps[direct]), statistics.median(rps[gateway])
    print(f"engine: vLLM CPU build, tiny Llama, /v1/completions max_tokens=1; {args.requests} requests per path")
    print(f"latency, sequential   p50 direct {percentile(direct_s, 50) * ms:.2f} ms, gateway {percentile(gateway_s, 50) * ms:.2f} ms"
          f" -> added {(percentile(gateway_s, 50) - percentile(direct_s, 50)) * ms:.2f} ms")
    print(f"                      p99 direct {percentile(direct_s, 99) * ms:.2f} ms, gateway {percentile(gateway_s, 99) * ms:.2f} ms"
          f" -> added {(percentile(gateway_s, 99) - percentile(direct_s, 99)) * ms:.2f} ms")
    print(f"throughput, {args.concurrency} clients  direct {direct_rps:.1f} req/s, gateway {gateway_rps:.1f} req/s"
          f" -> ratio {gateway_rps / direct_rps:.3f} (medians of {args.rounds} rounds:"
          f" direct {[round(r, 1) for r in rps[direct]]}, gateway {[round(r, 1) for r in rps[gateway]]})")
    print(f"/batch_generate of {args.batch} prompts (16 tokens each) {batch_s:.2f} s vs sequential /generate loop {loop_s:.2f} s"
          f" -> {loop_s / batch_s:.1f}x faster")


if __name__ == "__main__":
    main()
