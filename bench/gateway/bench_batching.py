"""Why a hop in front of vLLM costs throughput at high concurrency: vLLM's batches, direct and behind a hop.

Real vLLM (CPU build, tiny Llama) on core 0; on core 1 the load generator, the gateway and, as a
reference hop whose own CPU cost is near zero, nginx (a C reverse proxy with pooled keep-alive
connections: `apt-get install nginx-light`). N concurrent clients send 1-token /v1/completions for
a fixed time to each path in rotation (order shifted each round). Per path: requests/s, its ratio to
direct, the engine's iterations per request (from vLLM's own `vllm:iteration_tokens_total` count:
fewer requests per engine step means smaller batches, which cost more engine time per request), and
each core's utilization.

Run: .venv/bin/python -m bench.gateway.bench_batching [--seconds 5] [--rounds 6] [--concurrency 64]
"""

import asyncio
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

import aiohttp

from bench import harness
from bench.gateway.bench_gateway import (
    ALL_CORES, COMPLETION, Process, Upstream, answers, free_ports, gateway_in_front, place, requests_per_second, start_tiny_vllm,
)

NGINX_CONF = """daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body; proxy_temp_path {work}/nginx-proxy; fastcgi_temp_path {work}/nginx-fastcgi;
  uwsgi_temp_path {work}/nginx-uwsgi; scgi_temp_path {work}/nginx-scgi;
  upstream vllm {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://vllm; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }}
  }}
}}
"""


def core_busy() -> dict[str, tuple[int, int]]:
    """Per core: (busy jiffies, all jiffies) from /proc/stat."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            jiffies = [int(value) for value in values]
            cores[name] = (sum(jiffies) - jiffies[3] - jiffies[4], sum(jiffies))  # minus idle and iowait
    return cores


def engine_iterations(vllm_url: str) -> float:
    async def fetch() -> str:
        async with aiohttp.ClientSession() as session, session.get(vllm_url + "/metrics") as response:
            return await response.text()

    match = re.search(r"^vllm:iteration_tokens_total_count\{[^}]*\} (\S+)$", asyncio.run(fetch()), re.M)
    return float(match.group(1))


def start_nginx(upstream: str, work: Path) -> tuple[Process, str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        sys.exit("nginx is not installed: apt-get install nginx-light")
    port = free_ports(1)[0]
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, upstream=upstream, port=port))
    process = Process("nginx", [nginx, "-c", str(conf), "-p", str(work)], dict(os.environ), work)
    process.start()
    url = f"http://127.0.0.1:{port}"
    process.wait_until(lambda: answers(url + "/health"), 10)
    return process, url


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    if len(ALL_CORES) < 2:
        parser.error("needs at least 2 cores")

    body = json.dumps(COMPLETION).encode()
    measured = {}  # path -> {"rps": [...], "iterations": [...], "busy": {core: [...]}}
    with harness.report():
        with harness.helper_processes("nrq-") as work:
            vllm = start_tiny_vllm(work)
            vllm_url = vllm.url
            gateway, gateway_url = gateway_in_front(vllm_url, vllm.ray_address, work, 64)
            nginx, nginx_url = start_nginx(vllm_url.removeprefix("http://"), work)
            # The gateway and nginx alike are front processes: pinned beside the load generator.
            place("split", [Upstream(name, name, vllm_url, url, pid, vllm.engine_pids)
                            for name, url, pid in (("gateway", gateway_url, gateway.proc.pid), ("nginx", nginx_url, nginx.proc.pid))])
            paths = {"direct": vllm_url, "gateway": gateway_url, "nginx": nginx_url}
            order = list(paths)
            for round_number in range(args.rounds):
                shift = round_number % len(order)
                for name in order[shift:] + order[:shift]:
                    iterations_before, busy_before = engine_iterations(vllm_url), core_busy()
                    rps, _, _ = asyncio.run(requests_per_second(paths[name] + "/v1/completions", body, args.seconds, args.concurrency))
                    iterations, busy_after = engine_iterations(vllm_url) - iterations_before, core_busy()
                    record = measured.setdefault(name, {"rps": [], "iterations": [], "busy": {}})
                    record["rps"].append(rps)
                    # The warm-up requests (one per client) ran in the same interval: count them too.
                    record["iterations"].append(iterations / (rps * args.seconds + args.concurrency))
                    for core, (busy, total) in busy_after.items():
                        record["busy"].setdefault(core, []).append((busy - busy_before[core][0]) / (total - busy_before[core][1]))

        print(f"1-token /v1/completions, {args.concurrency} clients, {args.seconds:g} s per path per round, {args.rounds} rounds;"
              f" vLLM and Ray on core 0, load generator + gateway/nginx on core 1")
        direct = measured["direct"]["rps"]
        for name, record in measured.items():
            ratios = [value / base for base, value in zip(direct, record["rps"])]
            busy = ", ".join(f"{core} {statistics.median(values):.0%}" for core, values in record["busy"].items())
            print(f"{name:>8}: req/s median {statistics.median(record['rps']):6.1f}, vs direct median {statistics.median(ratios):.3f}"
                  f" per round {[round(r, 2) for r in ratios]}; engine iterations/request median"
                  f" {statistics.median(record['iterations']):.3f} {[round(i, 3) for i in record['iterations']]}; busy: {busy}")


if __name__ == "__main__":
    main()
