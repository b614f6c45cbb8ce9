"""What idling between request and answer does to the gateway's latency and CPU time, side by side.

Two fixed-answer upstreams (fixed_upstream.py): one answers at once, one after sleeping D ms (using
no CPU meanwhile, as the gateway waits on vLLM). One gateway in front of each. One request at a
time, direct and gateway alternating; blocks of N requests, upstreams alternating block by block.
Per block: p50 added by the gateway, and the CPU time per request of the gateway and of the
upstream (from /proc: CFS's exact runtime). With --no-halt, every other pair of blocks runs while
this process holds /dev/cpu_dma_latency at 0, which keeps idle CPUs polling instead of halting
(root only): it tells whether waking a halted (virtual) CPU is what costs.

Run: .venv/bin/python -m bench.gateway.bench_idle [--requests 600] [--blocks 4] [--delay-ms 7] [--no-halt]
"""

import asyncio
import json
import os
import struct
from contextlib import contextmanager, nullcontext

import aiohttp

from bench import harness
from bench.gateway.bench_gateway import COMPLETION, cpu_seconds, gateway_in_front, percentile, start_fixed_upstream, timed_in_rotation

WARMUP = 50


@contextmanager
def idle_cpus_poll():
    """While held, the kernel keeps idle CPUs out of any idle state with an exit latency (PM QoS)."""
    fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    try:
        os.write(fd, struct.pack("i", 0))
        yield
    finally:
        os.close(fd)


async def block(direct: str, gateway: str, count: int) -> dict[str, list[float]]:
    body = json.dumps(COMPLETION).encode()
    targets = {"direct": (direct + "/v1/completions", body), "gateway": (gateway + "/v1/completions", body)}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        return await timed_in_rotation(session, targets, count, WARMUP)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--requests", type=int, default=600, help="requests per path per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per upstream (per mode with --no-halt)")
    parser.add_argument("--delay-ms", type=float, default=7)
    parser.add_argument("--no-halt", action="store_true", help="also measure with idle CPUs polling (root)")
    args = parser.parse_args()

    lines = []
    with harness.report():
        with harness.helper_processes("nri-") as work:
            pairs = {}
            for delay in (0, args.delay_ms):
                upstream, upstream_url = start_fixed_upstream(work, delay)
                gateway, gateway_url = gateway_in_front(upstream_url, "127.0.0.1:1", work, 64)  # Ray is never asked here
                pairs[f"answer after {delay:g} ms"] = (upstream_url, upstream.proc.pid, gateway_url, gateway.proc.pid)
            modes = ["default idle", "idle CPUs polling"] if args.no_halt else ["default idle"]
            for number in range(args.blocks * len(modes)):
                mode = modes[number % len(modes)]
                for name, (upstream_url, upstream_pid, gateway_url, gateway_pid) in pairs.items():
                    before = cpu_seconds(gateway_pid), cpu_seconds(upstream_pid)
                    with idle_cpus_poll() if mode != "default idle" else nullcontext():
                        times = asyncio.run(block(upstream_url, gateway_url, args.requests))
                    gateway_cpu, upstream_cpu = cpu_seconds(gateway_pid) - before[0], cpu_seconds(upstream_pid) - before[1]
                    per_path = args.requests + WARMUP
                    added = (percentile(times["gateway"], 50) - percentile(times["direct"], 50)) * 1e3
                    lines.append(f"{name:>18}, {mode:<17}: p50 direct {percentile(times['direct'], 50) * 1e3:6.3f} ms, added {added:.3f} ms;"
                                 f" CPU per request: gateway {gateway_cpu / per_path * 1e6:4.0f} us,"
                                 f" upstream {upstream_cpu / (2 * per_path) * 1e6:4.0f} us")
        print(f"one request at a time, {args.requests} per path per block, {args.blocks} blocks per upstream and mode")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
