"""A Ray cluster across simulated hosts: one `ray start` per network namespace, on that host's address.

    with ray_hosts(3, workdir=tmp, prefix="fab", subnet="10.79.0.0/24",
                   node_env=lambda host, i: {"GLOO_SOCKET_IFNAME": host.interface}) as ray_cluster:
        ray_cluster.head.run(["node-runtime", "cluster", "check", "--address", ray_cluster.address, ...])

Each node's `ray start --block` gets its own environment (the raylet's, which every Ray worker on
that node inherits, as the Ray container's does in production) and its own temp dir; ports are
the namespace's own, so Ray's defaults cannot collide with anyone else's Ray on this machine. Each
is stopped by its own process group; the namespaces' teardown stops whatever is left inside them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import SimulatedCluster, SimulatedHost, simulated_hosts

from tests.support.processes import BIN, Process

GCS_PORT = 6379


@dataclass
class RayHosts:
    hosts: SimulatedCluster
    nodes: list[Process]

    @property
    def head(self) -> SimulatedHost:
        return self.hosts.hosts[0]

    @property
    def address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    def logs(self) -> str:
        return "\n".join(f"--- {node.name}\n{node.tail(15)}" for node in self.nodes)


def interface(host: SimulatedHost) -> str:
    """The host's end of its veth pair (tests/support/netns.py), the NIC holding its address."""
    return f"{host.netns}h"


@contextlib.contextmanager
def ray_hosts(count: int, *, prefix: str, subnet: str,
              node_env: Callable[[SimulatedHost, int], Mapping[str, str]] = lambda host, i: {},
              gpus: Sequence[int] = (), timeout: float = 240) -> Iterator[RayHosts]:
    """`count` Ray nodes, node i with `node_env(host, i)` and `gpus[i]` GPUs told to Ray (0 if not given)."""
    # Ray's socket paths must stay short: not under pytest's deep tmp_path.
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    nodes: list[Process] = []
    try:
        with simulated_hosts(count, workdir=work / "hosts", subnet=subnet, prefix=prefix, sshd=False) as hosts:
            for host in hosts.hosts:
                # The hosts share one subnet and need no default route. With one, the machine's DNS
                # server looks reachable but never answers there, and torch's TCPStore, which
                # reverse-resolves each client socket, waits 2 x 5 s for it on every connection.
                host.run(["ip", "route", "del", "default"])
            head = hosts.hosts[0]
            cluster = RayHosts(hosts, nodes)
            try:
                for i, host in enumerate(hosts.hosts):
                    role = (["--head", f"--port={GCS_PORT}", "--include-dashboard=false"] if i == 0
                            else [f"--address={cluster.address}"])
                    argv = host.exec_prefix() + [
                        str(BIN / "ray"), "start", "--block", *role, f"--node-ip-address={host.address}",
                        f"--temp-dir={work / f'ray{i}'}", "--num-cpus=1", f"--num-gpus={gpus[i] if i < len(gpus) else 0}",
                        "--object-store-memory=80000000", "--disable-usage-stats",
                    ]
                    # No drain on SIGTERM (Ray's default waits 30 s for a node's work to move elsewhere).
                    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                           **node_env(host, i)}
                    node = Process(f"ray-{host.name}", argv, env, work)
                    node.start()
                    nodes.append(node)

                def joined() -> bool:
                    for node in nodes[1:]:
                        if node.proc.poll() is not None:
                            raise RuntimeError(f"{node.name} exited with {node.proc.returncode}:\n{node.tail()}")
                    return head.run([str(BIN / "node-runtime"), "cluster", "wait", "--address", cluster.address,
                                     "--nodes", str(count), "--timeout", "10"], check=False, timeout=60).returncode == 0

                nodes[0].wait_until(joined, timeout)
                yield cluster
            finally:
                for node in reversed(nodes):  # workers first: they would wait for a stopped head
                    node.stop(grace=15)
    finally:
        shutil.rmtree(work, ignore_errors=True)
