"""`node-runtime cluster check`: the same software on every Ray node, and a collective across them.

The most common multi-node failure is a wrong interface or node address: Gloo binds to loopback,
NCCL/RCCL waits forever at init, and vLLM shows nothing but a hang. This check runs on the head
after the cluster is ready and before any model server starts. One Ray actor pinned to each alive
node reports the node's Python, Ray, vLLM and torch versions (what that node really imports) and
its network facts; then the actors join one torch.distributed process group through a rendezvous
on the head (`tcp://HEAD:PORT`) and all-reduce a tensor: Gloo across every node, and with `--nccl`
also torch's `nccl` backend (RCCL on DCU) across the nodes that have GPUs, one device each. The
actors live in the nodes' Ray containers, so they see what vLLM's workers will see there:
GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, VLLM_HOST_IP.

Nothing here may hang: every wait has the caller's deadline; a node whose actor never answered or
whose rendezvous never completed is named, and a watchdog ends the process if Ray itself stops
answering. Failures come back as one line per node, naming the interface variable and value it
used and what to set.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from node_runtime.errors import Failure
from node_runtime.serving.cluster import ClusterUnreachable, probe
from node_runtime.serving.spec import ClusterSpec

GLOO_IFNAME = "GLOO_SOCKET_IFNAME"
NCCL_IFNAME = "NCCL_SOCKET_IFNAME"
HOST_IP = "VLLM_HOST_IP"
VISIBLE_DEVICES = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
NODE_ENV = (GLOO_IFNAME, NCCL_IFNAME, HOST_IP, *VISIBLE_DEVICES)
COMPONENTS = {"python": "Python", "ray": "Ray", "vllm": "vLLM", "torch": "torch"}
BACKEND_NAMES = {"gloo": "Gloo", "nccl": "NCCL/RCCL"}
BACKEND_VARIABLE = {"gloo": GLOO_IFNAME, "nccl": NCCL_IFNAME}
DEFAULT_PORT = 29555
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives this resource to the head node only
# Once one node failed on its own, the others are only waiting for it: this long for a second
# node's own error, then the check stops rather than sit out the timeout.
OWN_FAILURE_GRACE_S = 3.0


class FabricCheckFailed(Failure):
    """The check failed, or could not run at all (no cluster, no head node, nothing to check with --nccl)."""


# --- on each node: facts, and its part of the collectives ----------------------------------------


def interfaces_here() -> dict[str, dict]:
    """This host's interfaces: up or not, and their IP addresses in the kernel's order."""
    import psutil

    stats = psutil.net_if_stats()
    found: dict[str, dict] = {}
    for name, addrs in psutil.net_if_addrs().items():
        ips = [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
        found[name] = {"up": bool(stats[name].isup) if name in stats else False, "addresses": ips}
    return found


def hostname_binding() -> tuple[str, str | None]:
    """(hostname, the first of its addresses this host can bind), as Gloo picks without GLOO_SOCKET_IFNAME.

    torch's ProcessGroupGloo.create_default_device resolves the hostname and takes the first address
    it can bind to, and falls back to loopback when there is none.
    """
    hostname = socket.gethostname()
    try:
        candidates = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        return hostname, None
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as candidate:
            try:
                candidate.bind(sockaddr)
            except OSError:
                continue
        return hostname, sockaddr[0]
    return hostname, None


def installed_versions() -> dict[str, str]:
    """What this Python process really imports (a vLLM that fails to import says why)."""
    import ray
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception as broken:  # noqa: BLE001 — any import failure is a finding, not a crash
        vllm_version = f"not importable ({type(broken).__name__}: {broken})"
    return {"python": platform.python_version(), "ray": ray.__version__, "vllm": vllm_version, "torch": torch.__version__}


def device_index(assigned: Sequence[str], visible: str | None) -> int:
    """torch's index of the GPU Ray assigned to this actor.

    Ray narrows HIP/CUDA_VISIBLE_DEVICES to the assigned device unless told not to
    (RAY_EXPERIMENTAL_NOSET_*_VISIBLE_DEVICES, which the DCU nodes set for vLLM): then the variable
    still lists the container's devices and torch counts from its first entry.
    """
    if not assigned:
        raise ValueError("Ray assigned this actor no GPU")
    gpu = str(assigned[0])
    if visible is None:
        return int(gpu)
    listed = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if gpu not in listed:
        raise ValueError(f"Ray assigned GPU {gpu}, which is not among the visible devices ({visible or 'none'})")
    return listed.index(gpu)


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the actors meet: the head's store, the group sizes, the time they may take."""

    host: str
    port: int
    world_size: int
    nccl_ranks: tuple[int, ...]
    timeout_s: float


def error_text(error: BaseException) -> str:
    """A torch/Gloo/NCCL error on one line, without the C++ frames and enforce prefixes.

    NCCL's cause comes after torch's first line ("NCCL error in: ...", "Last error:", then e.g.
    "Bootstrap : no socket interface found"), so every line before the frames is kept.
    """
    lines = []
    for line in str(error).splitlines():
        line = line.strip()
        if line.startswith(("Exception raised from", "frame #")):
            break
        if line.startswith("[enforce fail at") and "] " in line:
            line = line.split("] ", 1)[1]
        if line:
            lines.append(line)
    text = f"{type(error).__name__}: {' '.join(lines)}"
    return text if len(text) <= 500 else text[:497] + "..."


class Member:
    """One node's part of the check (a Ray actor pinned to that node). Calls never raise: they report."""

    def facts(self) -> dict:
        hostname, hostname_address = hostname_binding()
        return {
            "versions": installed_versions(),
            "env": {name: os.environ.get(name) for name in NODE_ENV},
            "interfaces": interfaces_here(),
            "hostname": hostname,
            "hostname_address": hostname_address,
        }

    def gloo(self, meeting: Rendezvous, rank: int) -> dict:
        """Join the process group of every node (Gloo) and all-reduce a CPU tensor."""
        import torch
        import torch.distributed as dist

        try:
            dist.init_process_group("gloo", init_method=f"tcp://{meeting.host}:{meeting.port}", rank=rank,
                                    world_size=meeting.world_size, timeout=timedelta(seconds=meeting.timeout_s))
            _all_reduce_and_check(torch.tensor([float(rank + 1)]), meeting.world_size, None)
        except Exception as failed:  # noqa: BLE001 — reported per node, with this node's facts
            return {"error": error_text(failed)}
        return {"error": None}

    def nccl(self, meeting: Rendezvous, rank: int) -> dict:
        """All-reduce one GPU tensor per node across `meeting.nccl_ranks` (torch's `nccl`: RCCL on ROCm)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return {"error": None, "skipped": True}  # its Gloo step failed and says why
        try:
            # Every rank of the Gloo group creates the subgroup (torch requires it); its members use it.
            group = dist.new_group(list(meeting.nccl_ranks), backend="nccl", timeout=timedelta(seconds=meeting.timeout_s))
            if rank in meeting.nccl_ranks:
                _gpu_all_reduce(group, meeting.nccl_ranks.index(rank), len(meeting.nccl_ranks))
        except Exception as failed:  # noqa: BLE001 — reported per node, with this node's facts
            return {"error": error_text(failed)}
        return {"error": None}


def _all_reduce_and_check(tensor, size: int, group) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor, group=group)
    expected = size * (size + 1) / 2
    got = float(tensor.sum().item())
    if got != expected:
        raise ValueError(f"all-reduce returned {got:g}, expected {expected:g}")


def _gpu_all_reduce(group, rank: int, size: int) -> None:
    import ray
    import torch

    if not torch.cuda.is_available():
        visible = ", ".join(f"{name}={os.environ.get(name)}" for name in VISIBLE_DEVICES)
        raise RuntimeError(f"torch sees no GPU ({visible})")
    visible = next((os.environ[name] for name in VISIBLE_DEVICES if name in os.environ), None)
    index = device_index(ray.get_runtime_context().get_accelerator_ids().get("GPU", []), visible)
    torch.cuda.set_device(index)
    _all_reduce_and_check(torch.tensor([float(rank + 1)], device=f"cuda:{index}"), size, group)
    torch.cuda.synchronize()


# --- on the head: what the nodes' answers mean (plain functions) --------------------------------


def nccl_interfaces(spec: str, names: Sequence[str]) -> list[str]:
    """The interfaces NCCL_SOCKET_IFNAME selects among `names`, by NCCL's rules.

    A comma-separated list of name prefixes; `=` before the list makes them exact names, `^`
    before it (and before `=`) excludes them instead; a `:port` suffix is ignored here.
    """
    exclude = spec.startswith("^")
    rest = spec[1:] if exclude else spec
    exact = rest.startswith("=")
    rest = rest[1:] if exact else rest
    wanted = [item.split(":")[0] for item in rest.split(",") if item]

    def matches(name: str) -> bool:
        return any(name == item if exact else name.startswith(item) for item in wanted)

    return [name for name in names if matches(name) != exclude]


@dataclass
class NodeReport:
    """One Ray node: its place in the check, what it reported, what went wrong there."""

    rank: int
    node_id: str
    address: str
    head: bool
    gpus: float
    nccl_rank: int | None = None
    facts: dict | None = None
    results: dict[str, dict] = field(default_factory=dict)  # per backend: {"error": ...}
    died: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"node {self.address}{' (head)' if self.head else ''}"

    @property
    def env(self) -> Mapping[str, str | None]:
        return (self.facts or {}).get("env", {})

    @property
    def interfaces(self) -> Mapping[str, dict]:
        return (self.facts or {}).get("interfaces", {})

    def advice(self) -> str:
        nic = next((name for name, nic in self.interfaces.items() if self.address in nic["addresses"]), None)
        return f"set the node's `interface` to {f'{nic}, ' if nic else ''}the NIC holding {self.address}"

    def uses(self, backend: str) -> str:
        variable = BACKEND_VARIABLE[backend]
        return f"{variable}={self.env.get(variable) or 'unset'}"

    def gloo_binding(self) -> tuple[str | None, str]:
        """(the address Gloo binds to on this node, how it came to it), as torch picks it."""
        value = self.env.get(GLOO_IFNAME)
        if value:
            # torch makes one device per listed name; the first carries the connections.
            nic = self.interfaces.get(value.split(",")[0])
            address = nic["addresses"][0] if nic and nic["up"] and nic["addresses"] else None
            return address, f"{GLOO_IFNAME}={value}"
        facts = self.facts or {}
        return (facts.get("hostname_address") or "127.0.0.1",
                f"{GLOO_IFNAME} unset, so the address of hostname {facts.get('hostname')!r}")

    def stuck_at(self, backends: Sequence[str]) -> str | None:
        """The first backend this node did not complete, or None."""
        for backend in backends:
            outcome = self.results.get(backend)
            if outcome is None or outcome["error"] or outcome.get("skipped"):
                return backend
        return None


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def interface_problem(report: NodeReport, backend: str) -> str | None:
    """Why the interface the backend is told to use cannot work on this node, if it cannot."""
    variable = BACKEND_VARIABLE[backend]
    value = report.env.get(variable)
    if not value:
        return None
    names = list(report.interfaces)
    if backend == "nccl":
        if any(report.interfaces[n]["addresses"] for n in nccl_interfaces(value, names)):
            return None
        return (f"NCCL/RCCL has no interface to use ({variable}={value} matches none of this node's "
                f"interfaces with an address: {', '.join(names) or 'none'}) — {report.advice()}")
    for name in value.split(","):
        nic = report.interfaces.get(name)
        if nic is None:
            reason = "no such device"
        elif not nic["up"]:
            reason = "it is down"
        elif not nic["addresses"]:
            reason = "it holds no IP address"
        else:
            continue
        return f"Gloo could not use interface {name} ({variable}={value}): {reason} — {report.advice()}"
    return None


def static_problems(report: NodeReport, world_size: int, nccl: bool) -> list[str]:
    """What the node's facts alone show: a missing interface, Gloo on loopback, a VLLM_HOST_IP Ray does not know."""
    problems = []
    missing = interface_problem(report, "gloo")
    if missing:
        problems.append(missing)
    else:
        address, how = report.gloo_binding()
        if world_size > 1 and _is_loopback(address):
            # Gloo's pairs connect from the higher address to the lower, so peers reach a node bound
            # to loopback only while its address sorts above theirs: the all-reduce may even pass.
            problems.append(f"Gloo binds to loopback {address} ({how}), which the other nodes cannot "
                            f"connect to — {report.advice()}")
    if nccl and report.nccl_rank is not None:
        problem = interface_problem(report, "nccl")
        if problem:
            problems.append(problem)
    host_ip = report.env.get(HOST_IP)
    if host_ip and host_ip != report.address:
        problems.append(f"{HOST_IP}={host_ip} but Ray knows this node as {report.address}: vLLM and Ray "
                        "must use the same address, the node's data-plane address")
    return problems


def version_problems(reports: Sequence[NodeReport]) -> None:
    """Add to each node whose versions differ from the head's a problem naming both."""
    head = next((r for r in reports if r.head and r.facts), None)
    if head is None:
        return
    reference = head.facts["versions"]
    for report in reports:
        if report is head or not report.facts:
            continue
        theirs = report.facts["versions"]
        differ = [key for key in COMPONENTS if theirs.get(key) != reference.get(key)]
        if differ:
            mine = ", ".join(f"{COMPONENTS[k]} {theirs.get(k)}" for k in differ)
            ref = ", ".join(f"{COMPONENTS[k]} {reference.get(k)}" for k in differ)
            report.problems.append(f"runs {mine} but the head {head.address} runs {ref} — every node must "
                                   "run the same node image")


def classify(error: str) -> str:
    """The kind of a collective's error, from torch's, Gloo's and NCCL's own messages."""
    text = error.lower()
    if "unable to find address for" in text or re.search(r"no (socket|nccl_socket_ifname) interface found", text):
        return "interface"
    if "doesn't have nccl built in" in text:
        return "no-backend"
    if "address already in use" in text or "eaddrinuse" in text:
        return "port"
    if "trying to connect to (" in text or "failed to connect/validate to host" in text:
        return "rendezvous"
    if "connect [" in text or "connection refused" in text or "connect timeout" in text or "connection reset" in text:
        return "peer"
    # Waiting for a node that never came, or cut off when the head's store gave up waiting for it.
    if "timed out" in text or "timeout" in text or "failed to recv" in text or "connection was likely closed" in text:
        return "waited"
    return "other"


def collective_problem(report: NodeReport, backend: str, meeting: Rendezvous) -> str | None:
    """The line for a node whose collective failed on its own; None when it succeeded or only waited."""
    error = report.results.get(backend, {}).get("error")
    if not error:
        return None
    kind = classify(error)
    name = BACKEND_NAMES[backend]
    if kind == "waited":
        return None
    if kind == "interface":
        return interface_problem(report, backend) or f"{name} found no usable interface ({report.uses(backend)}): {error} — {report.advice()}"
    if kind == "no-backend":
        return "this node's torch has no NCCL/RCCL backend (a CPU build?): the DCU profile needs the vendor image's torch"
    if kind == "port":
        return f"the rendezvous could not listen on port {meeting.port} of the head: it is in use — free it or pass another --port"
    if kind == "rendezvous":
        return (f"could not reach the rendezvous at {meeting.host}:{meeting.port} on the head — allow TCP "
                f"port {meeting.port} from {report.address} to {meeting.host}, and check the route between them")
    if backend == "gloo":
        address, how = report.gloo_binding()
        return f"the Gloo all-reduce failed ({how}, bound to {address or 'nothing'}): {error}"
    return f"the NCCL/RCCL all-reduce failed ({report.uses(backend)}): {error}"


def waited_problem(report: NodeReport, backend: str, meeting: Rendezvous) -> str:
    """The line for a node that never completed `backend` when no node failed on its own."""
    if backend == "gloo":
        address, how = report.gloo_binding()
        used = f"{how}, bound to {address}"
    else:
        used = report.uses(backend)
    return (f"the {BACKEND_NAMES[backend]} rendezvous did not complete within {meeting.timeout_s:.0f}s ({used}) — "
            f"check that the nodes reach each other on that interface; {report.advice()}")


@dataclass
class FabricResult:
    nodes: list[NodeReport]
    backends: list[str]
    port: int
    seconds: float = 0.0
    cluster_problems: list[str] = field(default_factory=list)
    waited: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.cluster_problems and not any(r.problems for r in self.nodes)

    def summary(self) -> dict:
        """The JSON the program exports: per node its address, versions and interfaces."""
        nodes = []
        for r in self.nodes:
            versions = (r.facts or {}).get("versions", {})
            nodes.append({
                "address": r.address, "head": r.head, "gpus": r.gpus,
                **{key: versions.get(key) for key in COMPONENTS},
                "gloo_interface": r.env.get(GLOO_IFNAME), "gloo_address": r.gloo_binding()[0] if r.facts else None,
                "nccl_interface": r.env.get(NCCL_IFNAME),
                "problem": "; ".join(r.problems) or None,
            })
        return {"ok": self.ok, "backends": self.backends, "port": self.port, "seconds": round(self.seconds, 1),
                "nodes": nodes}

    def failure_lines(self) -> list[str]:
        backends = " and ".join(BACKEND_NAMES[b] for b in self.backends)
        lines = [f"cluster check of {len(self.nodes)} nodes failed (versions; {backends} all-reduce through "
                 f"port {self.port} on the head):", *self.cluster_problems]
        lines += [f"{r.label}: {'; '.join(r.problems)}" for r in self.nodes if r.problems]
        if self.waited:
            lines.append(f"nodes that joined and waited for the ones above: {', '.join(self.waited)}")
        return lines


def judge(result: FabricResult, meeting: Rendezvous | None) -> None:
    """Turn what the nodes reported (or did not) into one problem list per node.

    `meeting` is None when the collectives never started (a node's actor did not come up).
    """
    nodes, nccl = result.nodes, "nccl" in result.backends
    version_problems(nodes)
    for r in nodes:
        if r.facts:
            r.problems[:0] = static_problems(r, len(nodes), nccl)
        if r.died:
            r.problems.append(f"the check's Ray actor failed {r.died}")
        elif r.facts is None:
            gpu = " (or no GPU free for it: do model servers hold them?)" if r.nccl_rank is not None else ""
            r.problems.append(f"the check's Ray actor did not start within the timeout{gpu} — see the node's Ray "
                              "logs (raylet.out in its Ray session directory)")
        for backend in result.backends if meeting else ():
            problem = collective_problem(r, backend, meeting)
            if problem and problem not in r.problems:  # a missing interface shows in its facts and in torch's error
                r.problems.append(problem)
    if meeting is None:
        return
    if any(r.problems for r in nodes):
        result.waited = [r.address for r in nodes if not r.problems and r.stuck_at(result.backends)]
        return
    for r in nodes:
        backend = r.stuck_at(result.backends)
        if backend:
            r.problems.append(waited_problem(r, backend, meeting))


def plan_members(nodes: Sequence[Mapping], head_host: str, nccl: bool) -> list[NodeReport]:
    """Alive Ray nodes as ranks: the head (the rendezvous's host) is rank 0, the rest by address.

    With `nccl`, the nodes with GPUs also get a rank in the NCCL group, in the same order.
    """
    alive = [n for n in nodes if n.get("Alive")]
    head = next((n for n in alive if HEAD_RESOURCE in n.get("Resources", {})), None)
    if head is None or head["NodeManagerAddress"] != head_host:
        known = f"Ray knows the head as {head['NodeManagerAddress']}" if head else "Ray reports no alive head node"
        raise FabricCheckFailed(f"--address names the head as {head_host}, but {known}: the head's `ray start "
                                "--node-ip-address` and the address workers join must be the same cluster address")
    others = sorted((n for n in alive if n is not head), key=lambda n: _address_key(n["NodeManagerAddress"]))
    reports = [NodeReport(rank=i, node_id=n["NodeID"], address=n["NodeManagerAddress"], head=i == 0,
                          gpus=float(n.get("Resources", {}).get("GPU", 0))) for i, n in enumerate([head, *others])]
    if nccl:
        with_gpus = [r for r in reports if r.gpus > 0]
        if not with_gpus:
            raise FabricCheckFailed("--nccl: no alive Ray node reports a GPU, so there is nothing to check with "
                                    "NCCL/RCCL (does `ray start` on the nodes get --num-gpus?)")
        for nccl_rank, report in enumerate(with_gpus):
            report.nccl_rank = nccl_rank
    return reports


def _address_key(address: str) -> tuple:
    try:
        return (0, ipaddress.ip_address(address))
    except ValueError:
        return (1, address)


def actor_options(report: NodeReport) -> dict:
    """Ray options of a node's actor: on that node only, no CPU held, one GPU when it is in the NCCL group."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "num_gpus": 1 if report.nccl_rank is not None else 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=report.node_id, soft=False)}


# --- the driver, on the head --------------------------------------------------------------------


@contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """Ends the process if Ray stops answering even the calls that have timeouts (e.g. at shutdown)."""

    def give_up() -> None:
        sys.stderr.write(f"error: cluster check: Ray did not answer within --timeout ({seconds:g}s); "
                         "see `ray status` on the head\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_fabric(cluster: ClusterSpec, *, port: int = DEFAULT_PORT, nccl: bool = False,
                 report: Callable[[str], None] = lambda line: None) -> FabricResult:
    """Run the check on `cluster` (its address, node count and timeout); FabricCheckFailed if it cannot run."""
    started = time.monotonic()
    # Stop waiting early enough to report and clean up inside the timeout.
    deadline = started + cluster.timeout_s - min(10.0, max(2.0, cluster.timeout_s / 10))
    with _watchdog(cluster.timeout_s):
        try:
            probe(cluster.ray_address, timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        except ClusterUnreachable as unreachable:
            raise FabricCheckFailed(str(unreachable)) from None
        import ray

        ray.init(address=cluster.ray_address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
        try:
            result = _run(ray, cluster, port, nccl, deadline, report)
        finally:
            ray.shutdown()
    result.seconds = time.monotonic() - started
    return result


def _run(ray, cluster: ClusterSpec, port: int, nccl: bool, deadline: float,
         report: Callable[[str], None]) -> FabricResult:
    head_host = cluster.ray_address.rsplit(":", 1)[0]
    nodes = plan_members(ray.nodes(), head_host, nccl)
    result = FabricResult(nodes, ["gloo", "nccl"] if nccl else ["gloo"], port)
    if len(nodes) != cluster.expected_nodes:
        result.cluster_problems.append(
            f"Ray reports {len(nodes)} alive nodes ({', '.join(r.address for r in nodes)}), expected "
            f"{cluster.expected_nodes}: `ray status` on the head shows which node is missing")
    report(f"checking {len(nodes)} nodes: {', '.join(r.address for r in nodes)}")
    member = ray.remote(Member)
    actors = [member.options(**actor_options(node)).remote() for node in nodes]
    try:
        _collect(ray, {actor.facts.remote(): (node, "facts") for actor, node in zip(actors, nodes)}, deadline,
                 grace=None)
        if all(node.facts for node in nodes):
            # Every actor is up, so they enter the rendezvous together: their own timeouts (torch's,
            # which a store connection overruns by its retry delay) end before the driver stops
            # waiting, and each reports how it failed.
            meeting = Rendezvous(host=head_host, port=port, world_size=len(nodes),
                                 nccl_ranks=tuple(r.rank for r in nodes if r.nccl_rank is not None),
                                 timeout_s=max(1.0, (deadline - time.monotonic()) * 0.75 - 2))
            # An actor runs its calls in order, Gloo then NCCL, so a missing answer shows the stage.
            _collect(ray, {getattr(actor, backend).remote(meeting, node.rank): (node, backend)
                           for actor, node in zip(actors, nodes) for backend in result.backends}, deadline,
                     grace=OWN_FAILURE_GRACE_S)
            judge(result, meeting)
        else:
            judge(result, None)
    finally:
        for actor in actors:
            ray.kill(actor)
    return result


def _collect(ray, pending: dict, deadline: float, grace: float | None) -> None:
    """Fill in each node's facts or results until all are in, or the deadline.

    With `grace`, a node failing on its own ends the wait that much later: the others can only be
    waiting for it now, and a second node's own error comes at once if there is one.
    """
    from ray.exceptions import RayError

    stop_at = deadline
    while pending and time.monotonic() < stop_at:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, min(1.0, stop_at - time.monotonic())))
        for ref in ready:
            node, stage = pending.pop(ref)
            try:
                value = ray.get(ref, timeout=5)
            except RayError as failed:
                # The actor died (its later calls fail the same way: keep the first) or could not start.
                where = "while gathering the node's facts" if stage == "facts" else f"during the {BACKEND_NAMES[stage]} all-reduce"
                node.died = node.died or f"{where}: {error_text(failed)}"
                failed_alone = True
            else:
                if stage == "facts":
                    node.facts = value
                else:
                    node.results[stage] = value
                failed_alone = bool(value.get("error")) and classify(value["error"]) != "waited"
            if grace is not None and failed_alone:
                stop_at = min(stop_at, time.monotonic() + grace)
