"""Two versions of the gateway side by side in one run: a git ref's and the working tree's.

Both gateways stand in front of the same fixed-answer upstream (fixed_upstream.py); requests go one
at a time to direct, old and new in rotation, so drift on a shared machine hits all three alike.
Prints, per endpoint, the p50/p99 each gateway adds to the direct call and its CPU time per request.
The old version runs from a `git archive` of the ref put first on PYTHONPATH.

A --variant adds the working tree again with more config keys (e.g. the access log on), measured in
the same rotation.

Run: .venv/bin/python -m bench.gateway.compare_versions [--old HEAD] [--requests 1500]
         [--variant 'access log={"access_log_percent": 100}']
"""

import asyncio
import json
import os
import subprocess
from pathlib import Path

import aiohttp

from bench import harness
from bench.gateway.bench_gateway import (
    COMPLETION, GENERATE, cpu_seconds, gateway_in_front, percentile, start_fixed_upstream, timed_in_rotation,
)

# (label, gateway path, body): the direct counterpart is always the same /v1/completions request.
ENDPOINTS = [
    ("/v1/completions", "/v1/completions", COMPLETION),
    ("/generate", "/generate", GENERATE),
    ("/v1/completions stream", "/v1/completions", {**COMPLETION, "stream": True}),
]


def archive(ref: str, into: Path) -> Path:
    """The runtime package as it is at `ref`."""
    tar = subprocess.run(["git", "-C", str(harness.ROOT), "archive", ref, "images/runtime"], check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return into / "images" / "runtime"


async def rotate(direct: str, gateways: dict[str, tuple[str, int]], count: int, warmup: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for label, path, body in ENDPOINTS:
            direct_body = json.dumps({**COMPLETION, "stream": body.get("stream", False)}).encode()
            gateway_body = json.dumps(body).encode()
            targets = {"direct": (direct + "/v1/completions", direct_body),
                       **{name: (url + path, gateway_body) for name, (url, _) in gateways.items()}}
            cpu_before = {name: cpu_seconds(pid) for name, (_, pid) in gateways.items()}
            times = await timed_in_rotation(session, targets, count, warmup)
            direct_p = {q: percentile(times["direct"], q) for q in (50, 99)}
            cells = [
                f"{name}: added p50 {(percentile(times[name], 50) - direct_p[50]) * 1e3:.3f} ms,"
                f" p99 {(percentile(times[name], 99) - direct_p[99]) * 1e3:.3f} ms,"
                f" CPU {(cpu_seconds(pid) - cpu_before[name]) / (warmup + count) * 1e6:.0f} us/request"
                for name, (_, pid) in gateways.items()
            ]
            print(f"{label:<24} direct p50 {direct_p[50] * 1e3:.3f} ms | " + " | ".join(cells))


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--old", default="HEAD", help="git ref of the old version")
    parser.add_argument("--requests", type=int, default=1500, help="requests per path and endpoint")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="also the working tree with these config keys")
    args = parser.parse_args()
    variants = [(name, json.loads(keys)) for name, _, keys in (variant.partition("=") for variant in args.variant)]

    with harness.report(), harness.helper_processes("nrc-") as work:
        _, fixed_url = start_fixed_upstream(work)
        gateways = {}
        versions = [(f"old ({args.old})", archive(args.old, work / "old"), {}), ("new (working tree)", None, {})]
        for name, package, extra in versions + [(name, None, keys) for name, keys in variants]:
            os.environ.pop("PYTHONPATH", None)
            if package:
                os.environ["PYTHONPATH"] = str(package)
            # Ray is never asked here; a version before route files takes its replica in the config.
            route_files = package is None or (package / "node_runtime/serving/gateway/route_files.py").exists()
            gateway, url = gateway_in_front(fixed_url, "127.0.0.1:1", work, 64, route_files=route_files, extra=extra)
            gateways[name] = (url, gateway.proc.pid)
        os.environ.pop("PYTHONPATH", None)
        asyncio.run(rotate(fixed_url, gateways, args.requests, args.warmup))


if __name__ == "__main__":
    main()
