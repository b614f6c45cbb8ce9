"""Is the Ray cluster there yet? Alive nodes and GPUs, as Ray's GCS reports them.

Each probe is `ray.init(address=...)` + `ray.nodes()` in a short-lived child process. Those two
calls are public API unchanged from Ray 2.4x to 2.60 (the GCS client classes are private and
moved between releases), and the child process keeps the caller safe from what a Ray driver
does on a bad day: `ray.init` to an address with no GCS retries for minutes, and a connected
driver exits when the GCS goes away — neither may hang the launcher past its deadline nor kill
the gateway. The probe needs what vLLM's Ray executor needs anyway: a Ray node on this host and
its session directory ({dataRoot}/ray), so a passing probe also means vLLM can attach.
"""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from node_runtime.serving.spec import ClusterSpec

PROBE_TIMEOUT_S = 30.0


class ClusterUnreachable(RuntimeError):
    """No answer from the GCS (wrong address, head down, or the probe timed out)."""


class ClusterNotReady(RuntimeError):
    """The wait ran out; the message names what is missing."""


@dataclass(frozen=True)
class ClusterState:
    nodes: int
    gpus: float

    def shortfall(self, spec: ClusterSpec) -> str | None:
        """What is missing against the spec, in words, or None when the cluster is complete."""
        if self.nodes >= spec.expected_nodes and self.gpus >= spec.expected_gpus:
            return None
        return (
            f"{self.nodes} of {spec.expected_nodes} nodes alive, {self.gpus:g} of {spec.expected_gpus} GPUs"
        )


def _probe_command(address: str) -> list[str]:
    return [sys.executable, "-m", "node_runtime.serving.cluster", address]


def _parse_probe(returncode: int, stdout: bytes, stderr: bytes, address: str) -> ClusterState:
    if returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        raise ClusterUnreachable(f"Ray at {address}: {lines[-1] if lines else f'probe exited {returncode}'}")
    counts = json.loads(stdout.decode().strip().splitlines()[-1])
    return ClusterState(nodes=counts["nodes"], gpus=counts["gpus"])


def _timeout_error(address: str, timeout: float) -> ClusterUnreachable:
    return ClusterUnreachable(f"Ray at {address} did not answer within {timeout:g}s (is the head up, is the port right?)")


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> ClusterState:
    try:
        done = subprocess.run(_probe_command(address), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise _timeout_error(address, timeout) from None
    return _parse_probe(done.returncode, done.stdout, done.stderr, address)


async def probe_async(address: str, timeout: float = PROBE_TIMEOUT_S) -> ClusterState:
    child = await asyncio.create_subprocess_exec(
        *_probe_command(address), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(child.communicate(), timeout)
    except asyncio.TimeoutError:
        child.kill()
        await child.wait()
        raise _timeout_error(address, timeout) from None
    return _parse_probe(child.returncode, stdout, stderr, address)


def wait_for_cluster(
    spec: ClusterSpec, *, interval: float = 2.0, report: Callable[[str], None] = lambda line: None
) -> ClusterState:
    """Probe until the cluster has its nodes and GPUs; ClusterNotReady after spec.timeout_s."""
    deadline = time.monotonic() + spec.timeout_s
    # What the cluster last reported is the useful part of a timeout message; a probe cut short by
    # the deadline only adds to it.
    last_shortfall: str | None = None
    last_seen = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        try:
            state = probe(spec.ray_address, timeout=max(1.0, min(PROBE_TIMEOUT_S, remaining)))
            missing = state.shortfall(spec)
            if missing is None:
                return state
            last_seen = last_shortfall = missing
        except ClusterUnreachable as unreachable:
            last_seen = f"{last_shortfall}; then {unreachable}" if last_shortfall else str(unreachable)
        report(f"waiting for the Ray cluster at {spec.ray_address}: {last_seen}")
        if time.monotonic() + interval >= deadline:
            raise ClusterNotReady(
                f"Ray cluster at {spec.ray_address} not ready after {spec.timeout_s:g}s: {last_seen} "
                f"(expected at least {spec.expected_nodes} nodes and {spec.expected_gpus} GPUs); "
                "check that every worker joined (`ray status` on the head) and its GPU count (--num-gpus)"
            )
        time.sleep(interval)


def _probe_here(address: str) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    alive = [node for node in ray.nodes() if node.get("Alive")]
    print(json.dumps({"nodes": len(alive), "gpus": sum(node["Resources"].get("GPU", 0) for node in alive)}))


if __name__ == "__main__":
    _probe_here(sys.argv[1])
