"""A Docker engine on every simulated host, reachable as `ssh root@<host> docker ...`.

    from tests.support.docker_hosts import docker_hosts

    with docker_hosts(3, workdir=tmp_path, private_dirs=["/srv/e2e"]) as cluster:
        cluster.docker(cluster.hosts[1], "ps")                 # that host's engine, from here
        cluster.ssh(cluster.hosts[1], "docker info")           # the same engine, through its sshd

Each host of `tests.support.netns.simulated_hosts` gets its own containerd and dockerd, started
inside the host's network and mount namespaces with `nsenter` (not `ip netns exec`, which
remounts /sys and leaves dockerd without its devices cgroup). A host-network container there
sees the host's own address, and a bind mount of a private dir sees the host's own files.

A session on the host's sshd finds its engine through `DOCKER_HOST`, set by that sshd alone
(`SetEnv`), so `ssh root@ip docker ...` and Docker's `ssh://root@ip` transport (which runs
`docker system dial-stdio` on the host) reach that host's engine; the root namespace's own
Docker setup is untouched.

Engines keep their data under `workdir/<host>/docker` (removed at teardown) and their sockets
under /run/vllm-dcu-e2e/<host> (short paths: unix sockets are limited to 108 bytes). Teardown
removes the engine's containers, then stops its dockerd and containerd by pid.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tests.support.netns import SimulatedCluster, SimulatedHost, simulated_hosts
from tests.support.waiting import ProcessDied, WaitFailed, Watched, wait_until

RUN_ROOT = Path("/run/vllm-dcu-e2e")
DEFAULT_SUBNET = "10.78.0.0/24"
_CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
"""


class EngineError(RuntimeError):
    pass


@dataclass
class DockerEngine:
    """One dockerd (with its own containerd) and how to reach it from the root namespace."""

    name: str
    socket: Path
    data_root: Path
    run_dir: Path
    dockerd: subprocess.Popen
    containerd: subprocess.Popen

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        result = subprocess.run(["docker", "-H", self.url, *args], timeout=timeout, **kwargs)
        if check and result.returncode:
            raise EngineError(f"docker {' '.join(args[:3])} on {self.name} failed: {_tail(result.stderr)}")
        return result

    def stop(self) -> None:
        """Remove this engine's containers, then stop dockerd and containerd (ours, by pid)."""
        if self.dockerd.poll() is None:
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
        for process in (self.dockerd, self.containerd):
            _terminate(process, grace=20)


def _tail(text: str | bytes | None, lines: int = 8) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _terminate(process: subprocess.Popen, *, grace: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def engine_socket(name: str) -> Path:
    return RUN_ROOT / name / "docker.sock"


def start_engine(name: str, *, state_dir: Path, exec_prefix: Sequence[str] = (), timeout: float = 60) -> DockerEngine:
    """Start containerd + dockerd under `exec_prefix` (a host's nsenter prefix; empty: here)."""
    run_dir = RUN_ROOT / name
    if run_dir.exists():
        if _pid_alive(run_dir / "dockerd.pid"):
            raise EngineError(f"an engine named {name!r} already runs ({run_dir})")
        _remove_run_dir(run_dir)  # left by a run that was killed
    run_dir.mkdir(parents=True)
    data_root = state_dir / "docker"
    (state_dir / "containerd").mkdir(parents=True, exist_ok=True)
    containerd_socket = run_dir / "containerd.sock"
    config = run_dir / "containerd.toml"
    config.write_text(_CONTAINERD_CONFIG.format(
        root=state_dir / "containerd", state=run_dir / "containerd-state", socket=containerd_socket
    ))
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Its own containerd: a shared one would start every container in the root namespaces.
    containerd = subprocess.Popen(
        [*exec_prefix, "containerd", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(log_dir / "containerd.log").open("ab"),
    )
    _wait_for(lambda: containerd_socket.exists(), containerd, f"containerd of {name}", log_dir / "containerd.log", timeout)
    socket = run_dir / "docker.sock"
    dockerd_args = [
        "dockerd",
        f"--host=unix://{socket}",
        f"--containerd={containerd_socket}",
        f"--data-root={data_root}",
        f"--exec-root={run_dir / 'exec'}",
        f"--pidfile={run_dir / 'dockerd.pid'}",
        # The hosts' networking is the namespace's own: no docker0, no NAT rules in the root namespace.
        "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
        f"--cgroup-parent=/vllm-dcu-e2e-{name}",
    ]
    storage = os.environ.get("E2E_DOCKER_STORAGE_DRIVER") or ("overlay2" if _overlay_supported() else "vfs")
    dockerd = subprocess.Popen(
        [*exec_prefix, *dockerd_args, f"--storage-driver={storage}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(log_dir / "dockerd.log").open("ab"),
    )
    engine = DockerEngine(name, socket, data_root, run_dir, dockerd, containerd)
    try:
        _wait_for(
            lambda: socket.exists() and engine.docker("version", check=False, timeout=10).returncode == 0,
            dockerd, f"dockerd of {name}", log_dir / "dockerd.log", timeout,
        )
    except BaseException:
        engine.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return engine


def _pid_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def _overlay_supported() -> bool:
    return "overlay" in Path("/proc/filesystems").read_text()


def _wait_for(ready, process: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    try:
        wait_until(ready, timeout=timeout, what=f"{what} ready", process=Watched(process, what, log))
    except (WaitFailed, ProcessDied) as failed:
        raise EngineError(str(failed)) from None


def _remove_run_dir(run_dir: Path) -> None:
    # dockerd leaves its namespace handle (exec-root/netns/default) mounted when it exits.
    for mount_point in mounts_under(run_dir):
        subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
    shutil.rmtree(run_dir, ignore_errors=True)


def remove_engine_state(engine: DockerEngine) -> None:
    _remove_run_dir(engine.run_dir)
    remove_in_background(engine.data_root)


def remove_in_background(directory: Path) -> None:
    """Delete `directory` in a process of its own, which outlives the test run if it must: an engine's
    data root holds the node image's files (hundreds of thousands), whose deletion took minutes of the
    suite's time. Renamed first, so the path is free at once."""
    if not directory.exists():
        return
    doomed = directory.with_name(f".{directory.name}.removing-{os.getpid()}-{time.monotonic_ns()}")
    directory.rename(doomed)
    subprocess.Popen(["rm", "-rf", "--one-file-system", str(doomed)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def mounts_under(directory: Path, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below `directory` in this mount namespace, deepest first."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    prefix = str(directory).rstrip("/")
    # Field 5 is the mount point, with spaces and other bytes octal-escaped.
    points = [line.split()[4].encode().decode("unicode_escape") for line in mountinfo.splitlines() if line]
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True)


@contextlib.contextmanager
def engine(name: str, *, state_dir: Path, exec_prefix: Sequence[str] = (), keep_data: bool = False) -> Iterator[DockerEngine]:
    """An engine for the duration of the block; its containers are gone afterwards, and so is
    its data unless `keep_data` (images and build cache then serve the next run)."""
    started = start_engine(name, state_dir=state_dir, exec_prefix=exec_prefix)
    try:
        yield started
    finally:
        started.stop()
        if keep_data:
            _remove_run_dir(started.run_dir)
        else:
            remove_engine_state(started)


@dataclass
class DockerCluster:
    """Simulated hosts, each with its Docker engine."""

    sim: SimulatedCluster
    engines: dict[str, DockerEngine]

    @property
    def hosts(self) -> list[SimulatedHost]:
        return self.sim.hosts

    def engine(self, host: SimulatedHost) -> DockerEngine:
        return self.engines[host.name]

    def docker(self, host: SimulatedHost, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.engine(host).docker(*args, **kwargs)

    def ssh(self, host: SimulatedHost, command: str, **kwargs) -> subprocess.CompletedProcess:
        return self.sim.ssh(host, command, **kwargs)


def subnet_in_use(subnet: str, addresses: str | None = None) -> str | None:
    """The first interface of this namespace with an IPv4 address inside `subnet`, if any:
    two clusters on one subnet would route each other's traffic to the wrong hosts."""
    if addresses is None:
        addresses = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    network = ipaddress.ip_network(subnet)
    for line in addresses.splitlines():
        words = line.split()
        if "inet" in words:
            interface = ipaddress.ip_interface(words[words.index("inet") + 1])
            if interface.ip in network or network.overlaps(interface.network):
                return f"{words[1]} {interface}"
    return None


@contextlib.contextmanager
def docker_hosts(
    count: int,
    *,
    workdir: str | os.PathLike,
    subnet: str = DEFAULT_SUBNET,
    prefix: str = "e2e",
    private_dirs: Sequence[str] = (),
) -> Iterator[DockerCluster]:
    """`count` simulated hosts (see tests.support.netns), each running its own Docker engine."""
    workdir = Path(workdir)
    taken = subnet_in_use(subnet)
    if taken:
        raise EngineError(f"subnet {subnet} is already in use here ({taken}), by another simulated cluster?"
                          " Wait for it to finish or choose another subnet")
    session_env = lambda host: {"DOCKER_HOST": f"unix://{engine_socket(host.name)}"}  # noqa: E731
    with simulated_hosts(
        count, workdir=workdir, subnet=subnet, prefix=prefix, private_dirs=private_dirs, session_env=session_env
    ) as sim:
        engines: dict[str, DockerEngine] = {}
        try:
            for host in sim.hosts:
                engines[host.name] = start_engine(
                    host.name, state_dir=workdir / host.name, exec_prefix=host.exec_prefix()
                )
            yield DockerCluster(sim, engines)
        finally:
            for started in engines.values():
                started.stop()
                remove_engine_state(started)
