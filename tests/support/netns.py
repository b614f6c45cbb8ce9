"""Simulated hosts on one machine: network namespaces with their own sshd.

    from tests.support.netns import simulated_hosts

    with simulated_hosts(3, subnet="10.77.0.0/24", prefix="ms", workdir=tmp_path,
                         private_dirs=["/srv/models"], rate="200mbit") as cluster:
        head, worker = cluster.hosts[0], cluster.hosts[1]
        worker.run(["ls", "/srv/models"])                     # runs inside that host
        subprocess.run(["ssh", "-F", str(cluster.ssh_config), worker.address, "hostname -I"])

What each host is:
- a network namespace `{prefix}{i}` joined by a veth pair to a bridge `{prefix}br` in the root
  namespace; the bridge holds the subnet's first address, hosts take the next ones;
- its own sshd (own config, own ed25519 host key, own authorized_keys holding a key made for
  this cluster; root login by key only, agent forwarding allowed), started as
  `nsenter --net=/var/run/netns/NAME unshare --mount --propagation private sh -c '<mounts>; exec sshd -D'`;
  `session_env(host)` (optional) gives variables that host's sshd sets in every session (`SetEnv`),
  e.g. the DOCKER_HOST of that host's own engine (tests/support/docker_hosts.py);
- optionally `private_dirs`: absolute paths that, inside that host, are bind mounts of a
  per-host directory `{workdir}/{host}/root{path}`. With "/root/.ssh" among them, sshd also
  honours that host's own /root/.ssh/authorized_keys. Namespaces otherwise share the root
  filesystem (and PIDs); a private path is what makes "the same absolute path on every node"
  hold different data per node, as on real machines. Everything reached through the host's
  sshd or `host.run` sees the host's view; the root namespace sees the real path.
- optionally shaped links: `rate` (tc tbf, e.g. "200mbit") and `delay` (tc netem, e.g.
  "5ms"; needs the kernel's sch_netem) on both directions of each host's veth.

`cluster.ssh_config` is an ssh_config file (use `ssh -F`) naming the cluster key, a
known_hosts file with every host's real host key (strict checking on) and BatchMode, for
every host address. The cluster's key pair is `cluster.key` / `cluster.key.pub`.

Teardown stops only the processes inside this cluster's namespaces (`ip netns pids`), then
deletes the namespaces, veths and bridge, and the iptables rule it added. Needs root,
iproute2 and openssh-server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from tests.support.waiting import Watched, wait_until

SSHD = "/usr/sbin/sshd"
_SSHD_CONFIG = """\
ListenAddress {address}
Port 22
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile {pid_file}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowAgentForwarding yes
AllowTcpForwarding yes
Subsystem sftp internal-sftp
LogLevel ERROR
"""


def _sh(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


@dataclass
class SimulatedHost:
    name: str
    address: str
    netns: str
    private_dirs: dict[str, Path] = field(default_factory=dict)
    sshd_pid: int | None = None
    host_key_pub: str = ""
    sshd: Watched | None = field(default=None, repr=False, compare=False)  # what a wait for it watches

    @property
    def ssh_target(self) -> str:
        return f"root@{self.address}"

    def exec_prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host (its network and mounts)."""
        if self.sshd_pid is None:
            return ["nsenter", f"--net=/var/run/netns/{self.netns}", "--"]
        return ["nsenter", f"--target={self.sshd_pid}", "--net", "--mount", "--"]

    def run(self, args: Sequence[str] | str, *, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside this host; a string runs through `sh -c`."""
        argv = ["sh", "-c", args] if isinstance(args, str) else list(args)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.exec_prefix() + argv, check=check, timeout=timeout, **kwargs)

    def popen(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.exec_prefix() + list(args), **kwargs)


@dataclass
class SimulatedCluster:
    hosts: list[SimulatedHost]
    bridge: str
    bridge_address: str
    workdir: Path
    key: Path
    ssh_config: Path
    known_hosts: Path

    def ssh(self, host: SimulatedHost, command: str, *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `command` on `host` through its sshd, from the root namespace."""
        return _sh("ssh", "-F", str(self.ssh_config), host.address, command, check=check, timeout=timeout)

    def shape(self, host: SimulatedHost, *, rate: str | None = None, delay: str | None = None) -> None:
        """(Re)shape both directions of `host`'s link; no rate and no delay removes shaping."""
        for netns, dev in ((host.netns, f"{host.netns}h"), (None, f"{host.netns}b")):
            run = (lambda *a: _sh("ip", "netns", "exec", netns, *a, check=False)) if netns else (lambda *a: _sh(*a, check=False))
            run("tc", "qdisc", "del", "dev", dev, "root")
            if delay:
                netem = ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", delay, "limit", "100000"]
                result = run(*netem, *(["rate", rate] if rate else []))
                if result.returncode:
                    raise RuntimeError(f"tc netem (delay={delay}) failed: {result.stderr.strip()} — the kernel needs sch_netem")
            elif rate:
                # burst of 1/100 s of traffic (at least 32 KiB) keeps tbf's rate smooth at these speeds
                result = run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "200ms")
                if result.returncode:
                    raise RuntimeError(f"tc tbf rate={rate} failed on {dev}: {result.stderr.strip()}")


def _make_keys(workdir: Path) -> Path:
    key = workdir / "cluster_ed25519"
    if not key.exists():
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "simulated-cluster", "-f", str(key))
    return key


def _kill_netns_processes(netns: str) -> None:
    """Stop what runs in our own namespace: its sshd and the sessions it spawned."""
    pids = _sh("ip", "netns", "pids", netns, check=False).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in map(int, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        if not alive:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in alive):
            time.sleep(0.05)
        pids = [str(p) for p in alive if Path(f"/proc/{p}").exists()]


def _wait_for_port(host: SimulatedHost, port: int, timeout: float = 15) -> None:
    """Until `host`'s sshd listens on `port`; at once an error with its log if it has exited."""
    probe = f"import socket; socket.create_connection(('{host.address}', {port}), 1).close()"
    wait_until(lambda: host.run(["python3", "-c", probe], check=False, timeout=5).returncode == 0,
               timeout=timeout, interval=0.1, what=f"sshd of {host.name} listening on {host.address}:{port}",
               process=host.sshd)


@contextlib.contextmanager
def simulated_hosts(
    count: int,
    *,
    workdir: str | os.PathLike,
    subnet: str = "10.77.0.0/24",
    prefix: str = "sim",
    private_dirs: Sequence[str] = (),
    rate: str | None = None,
    delay: str | None = None,
    sshd: bool = True,
    session_env: Callable[[SimulatedHost], Mapping[str, str]] | None = None,
) -> Iterator[SimulatedCluster]:
    """Create `count` simulated hosts; see the module docstring."""
    if len(prefix) > 10:
        raise ValueError(f"prefix {prefix!r} is longer than 10 characters (interface names are limited to 15)")
    network = ipaddress.ip_network(subnet)
    addresses = list(network.hosts())
    if count + 1 > len(addresses):
        raise ValueError(f"subnet {subnet} has room for {len(addresses) - 1} hosts, not {count}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bridge = f"{prefix}br"
    bridge_address = str(addresses[0])
    key = _make_keys(workdir)
    known_hosts = workdir / "known_hosts"
    ssh_config = workdir / "ssh_config"
    hosts: list[SimulatedHost] = []
    iptables_rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    try:
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{bridge_address}/{network.prefixlen}", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        # Docker's FORWARD policy DROP would otherwise eat bridged traffic (br_netfilter).
        _sh("iptables", "-I", *iptables_rule, check=False)
        for i in range(count):
            name = f"{prefix}{i}"
            host = SimulatedHost(name=name, address=str(addresses[i + 1]), netns=name)
            hosts.append(host)
            _sh("ip", "netns", "add", name)
            _sh("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}b")
            _sh("ip", "link", "set", f"{name}h", "netns", name)
            _sh("ip", "link", "set", f"{name}b", "master", bridge, "up")
            for cmd in (
                ["ip", "addr", "add", f"{host.address}/{network.prefixlen}", "dev", f"{name}h"],
                ["ip", "link", "set", f"{name}h", "up"],
                ["ip", "link", "set", "lo", "up"],
                ["ip", "route", "add", "default", "via", bridge_address],
            ):
                _sh("ip", "netns", "exec", name, *cmd)
            for path in private_dirs:
                if not os.path.isabs(path):
                    raise ValueError(f"private dir {path!r} must be an absolute path")
                backing = workdir / name / "root" / path.lstrip("/")
                backing.mkdir(parents=True, exist_ok=True)
                Path(path).mkdir(parents=True, exist_ok=True)
                host.private_dirs[path] = backing
        cluster = SimulatedCluster(hosts, bridge, bridge_address, workdir, key, ssh_config, known_hosts)
        if rate or delay:
            for host in hosts:
                cluster.shape(host, rate=rate, delay=delay)
        if sshd:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
            for host in hosts:
                _start_sshd(host, workdir / host.name, key, session_env(host) if session_env else {})
            known_hosts.write_text("".join(f"{h.address} {h.host_key_pub}\n" for h in hosts))
            ssh_config.write_text("".join(
                f"Host {h.address}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
                f"  ConnectTimeout 5\n"
                for h in hosts
            ))
            for host in hosts:
                _wait_for_port(host, 22)
        yield cluster
    finally:
        for host in hosts:
            _kill_netns_processes(host.netns)
            _sh("ip", "link", "del", f"{host.netns}b", check=False)
            _sh("ip", "netns", "del", host.netns, check=False)
        _sh("iptables", "-D", *iptables_rule, check=False)
        _sh("ip", "link", "del", bridge, check=False)


def _start_sshd(host: SimulatedHost, hostdir: Path, key: Path, session_env: Mapping[str, str]) -> None:
    hostdir.mkdir(parents=True, exist_ok=True)
    host_key = hostdir / "ssh_host_ed25519_key"
    if not host_key.exists():
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    host.host_key_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
    authorized_keys = hostdir / "authorized_keys"
    authorized_keys.write_text(Path(f"{key}.pub").read_text())
    config = hostdir / "sshd_config"
    keys_files = str(authorized_keys)
    if "/root/.ssh" in host.private_dirs:
        # root's ~/.ssh is this host's own: keys authorized there (e.g. a relay key) count too.
        keys_files += " /root/.ssh/authorized_keys"
    config.write_text(_SSHD_CONFIG.format(
        address=host.address, host_key=host_key, authorized_keys=keys_files, pid_file=hostdir / "sshd.pid"
    ) + "".join(f'SetEnv {name}="{value}"\n' for name, value in session_env.items()))
    mounts = "".join(f"mount --bind {shlex.quote(str(b))} {shlex.quote(p)} && " for p, b in host.private_dirs.items())
    process = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{host.netns}", "unshare", "--mount", "--propagation", "private",
         "sh", "-c", f"{mounts}exec {SSHD} -D -e -f {shlex.quote(str(config))}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(hostdir / "sshd.log").open("ab"),
    )
    host.sshd_pid = process.pid
    host.sshd = Watched(process, f"sshd of {host.name}", hostdir / "sshd.log")
