"""Gateway throughput by number of worker processes (`gatewayWorkers`), side by side in one run.

One fixed-answer upstream (fixed_upstream.py: the gateway's own cost) and one real vLLM (CPU build,
tiny Llama), each with gateways of every worker count asked for in front; N concurrent clients send
1-token /v1/completions for a fixed time to direct and to each gateway in rotation (order shifted
each round). Every process may use every core, so on a small machine the workers, the upstream and
the load generator compete: this measures what extra workers buy where cores are scarce, and the
gateway's capacity where the upstream is not the limit.

Run: .venv/bin/python -m bench.gateway.bench_workers [--workers 1 2] [--seconds 5] [--rounds 4] [--concurrency 64]
"""

import asyncio
import json
import statistics

import psutil

from bench import harness
from bench.gateway.bench_gateway import (
    ALL_CORES, COMPLETION, cpu_seconds, gateway_in_front, requests_per_second, start_fixed_upstream, start_tiny_vllm,
)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a gateway: its supervisor and every worker."""
    total = cpu_seconds(pid)
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += cpu_seconds(child.pid)
        except FileNotFoundError:
            pass
    return total


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    results = {}  # upstream -> path -> (req/s per round, gateway CPU s, requests)
    body = json.dumps(COMPLETION).encode()
    with harness.report():
        with harness.helper_processes("nrw-") as work:
            vllm = start_tiny_vllm(work)
            _, fixed_url = start_fixed_upstream(work)
            for upstream, url in (("fixed answer", fixed_url), ("real vLLM CPU", vllm.url)):
                paths = {"direct": (url, None)}
                for workers in args.workers:
                    gateway, gateway_url = gateway_in_front(url, vllm.ray_address, work, 64, workers)
                    paths[f"{workers} worker{'s' if workers > 1 else ''}"] = (gateway_url, gateway.proc.pid)
                measured = results[upstream] = {name: ([], 0.0, 0) for name in paths}
                order = list(paths)
                for round_number in range(args.rounds):
                    shift = round_number % len(order)
                    for name in order[shift:] + order[:shift]:
                        target, pid = paths[name]
                        cpu_before = tree_cpu_seconds(pid) if pid else 0.0
                        rps, _, sent = asyncio.run(requests_per_second(target + "/v1/completions", body, args.seconds, args.concurrency))
                        per_round, cpu, requests = measured[name]
                        per_round.append(rps)
                        measured[name] = (per_round, cpu + (tree_cpu_seconds(pid) - cpu_before if pid else 0.0), requests + sent)

        print(f"1-token /v1/completions, {args.concurrency} clients, {args.seconds:g} s per path per round, {args.rounds} rounds,"
              f" cores {ALL_CORES} shared by all")
        for upstream, measured in results.items():
            print(f"\n== upstream: {upstream}")
            direct = measured["direct"][0]
            for name, (per_round, cpu, requests) in measured.items():
                ratios = [g / d for d, g in zip(direct, per_round)]
                cpu_note = f", gateway CPU {cpu / requests * 1e6:.0f} us/request" if requests and cpu else ""
                print(f"{name:>10}: req/s median {statistics.median(per_round):8.1f}, per round {[round(r, 1) for r in per_round]};"
                      f" vs direct median {statistics.median(ratios):.3f}{cpu_note}")


if __name__ == "__main__":
    main()
