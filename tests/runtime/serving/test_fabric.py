"""`node-runtime cluster check`: versions and a collective across Ray nodes, failing with one line per node.

The plain functions are tested with the errors torch, Gloo and NCCL really raise; the slow tests run
the command on a real Ray cluster across network namespaces (prefix `fab`, 10.79.0.0/24), where
each node's raylet (and so every Ray worker on it) has its own GLOO_SOCKET_IFNAME, PYTHONPATH, ...
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import subprocess
from functools import cache
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist

from node_runtime.serving.fabric import (
    FabricCheckFailed,
    FabricResult,
    Member,
    NodeReport,
    Rendezvous,
    actor_options,
    classify,
    collective_problem,
    device_index,
    error_text,
    judge,
    nccl_interfaces,
    plan_members,
    static_problems,
    version_problems,
)

from tests.support.processes import BIN, free_ports
from .ray_hosts import interface, ray_hosts

SUBNET, PREFIX = "10.79.0.0/24", "fab"
VERSIONS = {"python": "3.10.12", "ray": "2.43.0", "vllm": "0.9.2", "torch": "2.5.1+das.opt1"}
MEETING = Rendezvous(host="10.0.0.1", port=29555, world_size=3, nccl_ranks=(0, 1, 2), timeout_s=100)
# What torch raised here and elsewhere (the NCCL one from pytorch's and NCCL's issue trackers).
GLOO_NO_DEVICE = "RuntimeError: ifa != nullptr. Unable to find address for: eth9"
NCCL_NO_INTERFACE = ("DistBackendError: NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:2588, "
                     "internal error - please report this issue to the NCCL developers, NCCL version 2.21.5 "
                     "ncclInternalError: Internal check failed. Last error: Bootstrap : no socket interface found")
STORE_UNREACHABLE = ("DistNetworkError: The client socket has timed out after 10000ms while trying to connect to "
                     "(10.0.0.1, 29555).")
KEYS_NEVER_CAME = "DistStoreError: wait timeout after 8000ms, keys: /default_pg/0//cpu//0/1"
CLIENTS_NEVER_CAME = "DistStoreError: Timed out after 9 seconds waiting for clients. 1/2 clients joined."
STORE_GONE = ("DistNetworkError: Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server "
              "shutdown or crash?")


def nic(*addresses: str, up: bool = True) -> dict:
    return {"up": up, "addresses": list(addresses)}


def node(address: str, *, rank: int = 1, head: bool = False, nccl_rank: int | None = None, env: dict | None = None,
         interfaces: dict | None = None, versions: dict | None = None, hostname_address: str | None = None) -> NodeReport:
    """A node as the check sees it once its actor reported (`env` unset variables are None)."""
    report = NodeReport(rank=rank, node_id=f"id-{address}", address=address, head=head, gpus=8 if nccl_rank is not None else 0,
                        nccl_rank=nccl_rank)
    report.facts = {
        "versions": versions or dict(VERSIONS),
        "env": {"GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": None, "VLLM_HOST_IP": None, **(env or {})},
        "interfaces": interfaces if interfaces is not None else {"lo": nic("127.0.0.1", "::1"), "eth0": nic(address)},
        "hostname": "dcu-node", "hostname_address": hostname_address,
    }
    return report


# --- what the nodes' facts mean -----------------------------------------------------------------


@pytest.mark.parametrize("spec, selected", [
    ("eth", ["eth0", "eth1"]),
    ("ib,eth1", ["eth1", "ib0"]),
    ("=eth1", ["eth1"]),
    ("=eth", []),
    ("^eth", ["lo", "ib0", "docker0"]),
    ("^=eth0,lo", ["eth1", "ib0", "docker0"]),
    ("ib0:5000", ["ib0"]),
])
def test_nccl_interfaces_follow_nccls_rules(spec, selected):
    assert nccl_interfaces(spec, ["lo", "eth0", "eth1", "ib0", "docker0"]) == [n for n in ["lo", "eth0", "eth1", "ib0", "docker0"] if n in selected]


def test_a_missing_gloo_interface_names_node_variable_and_the_nic_to_set():
    report = node("10.78.0.3", env={"GLOO_SOCKET_IFNAME": "eth9"})
    assert static_problems(report, 3, nccl=False) == [
        "Gloo could not use interface eth9 (GLOO_SOCKET_IFNAME=eth9): no such device — "
        "set the node's `interface` to eth0, the NIC holding 10.78.0.3"]


@pytest.mark.parametrize("interfaces, reason", [
    ({"eth0": nic("10.78.0.3"), "eth1": nic("192.168.1.3", up=False)}, "it is down"),
    ({"eth0": nic("10.78.0.3"), "eth1": nic()}, "it holds no IP address"),
])
def test_a_gloo_interface_down_or_without_address_says_so(interfaces, reason):
    report = node("10.78.0.3", env={"GLOO_SOCKET_IFNAME": "eth1"}, interfaces=interfaces)
    assert static_problems(report, 2, nccl=False) == [
        f"Gloo could not use interface eth1 (GLOO_SOCKET_IFNAME=eth1): {reason} — "
        "set the node's `interface` to eth0, the NIC holding 10.78.0.3"]


def test_gloo_on_loopback_is_a_problem_with_workers_only():
    report = node("10.78.0.3", env={"GLOO_SOCKET_IFNAME": "lo"})
    expected = ("Gloo binds to loopback 127.0.0.1 (GLOO_SOCKET_IFNAME=lo), which the other nodes cannot connect to "
                "— set the node's `interface` to eth0, the NIC holding 10.78.0.3")
    assert static_problems(report, 2, nccl=False) == [expected]
    assert static_problems(report, 1, nccl=False) == []


@pytest.mark.parametrize("hostname_address, problem", [
    ("127.0.1.1", True),   # Debian's /etc/hosts line for the hostname
    (None, True),          # the hostname resolves to nothing bindable: torch falls back to loopback
    ("10.78.0.3", False),
])
def test_without_gloo_interface_the_hostnames_address_decides(hostname_address, problem):
    report = node("10.78.0.3", hostname_address=hostname_address)
    problems = static_problems(report, 3, nccl=False)
    assert bool(problems) == problem
    if problem:
        assert "GLOO_SOCKET_IFNAME unset, so the address of hostname 'dcu-node'" in problems[0]
        assert problems[0].endswith("set the node's `interface` to eth0, the NIC holding 10.78.0.3")


def test_nccl_interface_that_matches_nothing_is_named_with_what_the_node_has():
    report = node("10.78.0.3", nccl_rank=1, env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib"})
    expected = ("NCCL/RCCL has no interface to use (NCCL_SOCKET_IFNAME=ib matches none of this node's interfaces "
                "with an address: lo, eth0) — set the node's `interface` to eth0, the NIC holding 10.78.0.3")
    assert static_problems(report, 2, nccl=True) == [expected]
    # Only with --nccl, and only on a node in the NCCL group.
    assert static_problems(report, 2, nccl=False) == []
    assert static_problems(node("10.78.0.4", env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib"}), 2, nccl=True) == []


def test_nccl_interface_matching_by_prefix_is_fine():
    report = node("10.78.0.3", nccl_rank=0, env={"NCCL_SOCKET_IFNAME": "eth", "GLOO_SOCKET_IFNAME": "eth0"})
    assert static_problems(report, 2, nccl=True) == []


def test_vllm_host_ip_must_be_the_address_ray_knows():
    report = node("10.78.0.3", env={"GLOO_SOCKET_IFNAME": "eth0", "VLLM_HOST_IP": "192.168.0.3"})
    assert static_problems(report, 2, nccl=False) == [
        "VLLM_HOST_IP=192.168.0.3 but Ray knows this node as 10.78.0.3: vLLM and Ray must use the same address, "
        "the node's data-plane address"]


def test_versions_differing_from_the_heads_name_the_node_and_both_versions():
    head = node("10.78.0.2", rank=0, head=True)
    same = node("10.78.0.3")
    other = node("10.78.0.4", versions={**VERSIONS, "vllm": "0.8.5", "torch": "2.4.1"})
    version_problems([head, same, other])
    assert head.problems == [] and same.problems == []
    assert other.problems == ["runs vLLM 0.8.5, torch 2.4.1 but the head 10.78.0.2 runs vLLM 0.9.2, "
                              "torch 2.5.1+das.opt1 — every node must run the same node image"]


# --- torch's errors, as they are raised ----------------------------------------------------------


def test_error_text_keeps_the_message_without_cpp_frames():
    with pytest.raises(RuntimeError) as raised:
        dist.ProcessGroupGloo.create_device(interface="eth9")  # what init_process_group does with GLOO_SOCKET_IFNAME
    assert error_text(raised.value) == GLOO_NO_DEVICE
    nccl = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1207, internal error, NCCL version 2.14.3\n"
                        "ncclInternalError: Internal check failed.\nLast error:\nBootstrap : no socket interface found\n"
                        "Exception raised from getNCCLComm at ProcessGroupNCCL.cpp:1207\nframe #0: c10::Error::Error")
    assert error_text(nccl).endswith("Last error: Bootstrap : no socket interface found")


@pytest.mark.parametrize("error, kind", [
    (GLOO_NO_DEVICE, "interface"),
    (NCCL_NO_INTERFACE, "interface"),
    ("RuntimeError: Distributed package doesn't have NCCL built in", "no-backend"),
    ("DistNetworkError: The server socket has failed to listen on any local network address. port: 29555, "
     "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use", "port"),
    (STORE_UNREACHABLE, "rendezvous"),
    ("RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:144] connect [127.0.1.1]:40123: "
     "Connection refused", "peer"),
    (KEYS_NEVER_CAME, "waited"),
    (CLIENTS_NEVER_CAME, "waited"),
    (STORE_GONE, "waited"),
    ("ValueError: all-reduce returned 5, expected 6", "other"),
])
def test_classify(error, kind):
    assert classify(error) == kind


# --- the NCCL path (no GPU here: its arguments and its failures) ---------------------------------


def ray_node(address: str, resources: dict, alive: bool = True) -> dict:
    """One entry of `ray.nodes()`: its id is the address as Ray's 28-byte hex."""
    return {"NodeID": address.encode().hex().ljust(56, "0"), "Alive": alive, "NodeManagerAddress": address,
            "Resources": resources}


def test_nccl_group_is_the_nodes_with_gpus_head_first():
    nodes = [
        ray_node("10.0.0.12", {"GPU": 8.0, "CPU": 64}),
        ray_node("10.0.0.9", {"GPU": 8.0}, alive=False),
        ray_node("10.0.0.3", {"CPU": 8}),
        ray_node("10.0.0.1", {"GPU": 8.0, "node:__internal_head__": 1.0}),
        ray_node("10.0.0.11", {"GPU": 4.0}),
    ]
    reports = plan_members(nodes, "10.0.0.1", nccl=True)
    assert [(r.address, r.rank, r.nccl_rank, r.head) for r in reports] == [
        ("10.0.0.1", 0, 0, True), ("10.0.0.3", 1, None, False), ("10.0.0.11", 2, 1, False), ("10.0.0.12", 3, 2, False)]
    assert [r.nccl_rank for r in plan_members(nodes, "10.0.0.1", nccl=False)] == [None] * 4
    options = [actor_options(r) for r in reports]
    assert [o["num_gpus"] for o in options] == [1, 0, 1, 1] and {o["num_cpus"] for o in options} == {0}
    assert [(o["scheduling_strategy"].node_id, o["scheduling_strategy"].soft) for o in options] == [
        (ray_node(a, {})["NodeID"], False) for a in ("10.0.0.1", "10.0.0.3", "10.0.0.11", "10.0.0.12")]


def test_nccl_with_no_gpu_node_or_a_head_elsewhere_cannot_run():
    head = ray_node("10.0.0.1", {"node:__internal_head__": 1.0})
    with pytest.raises(FabricCheckFailed, match="--nccl: no alive Ray node reports a GPU"):
        plan_members([head], "10.0.0.1", nccl=True)
    with pytest.raises(FabricCheckFailed, match="--address names the head as 192.168.0.1, but Ray knows the head as 10.0.0.1"):
        plan_members([head], "192.168.0.1", nccl=False)


@pytest.mark.parametrize("assigned, visible, index", [
    (["0"], "0", 0),               # Ray narrowed the visible devices to its choice
    (["5"], "4,5,6,7", 1),         # RAY_EXPERIMENTAL_NOSET_*: the container's devices stay visible
    (["3"], None, 3),              # nothing narrows: torch sees every device
])
def test_device_index(assigned, visible, index):
    assert device_index(assigned, visible) == index


@pytest.mark.parametrize("assigned, visible, message", [
    ([], "0", "Ray assigned this actor no GPU"),
    (["2"], "0,1", r"Ray assigned GPU 2, which is not among the visible devices \(0,1\)"),
])
def test_device_index_refuses(assigned, visible, message):
    with pytest.raises(ValueError, match=message):
        device_index(assigned, visible)


def test_nccl_failures_name_the_node_variable_and_what_to_set():
    report = node("10.78.0.3", nccl_rank=1, env={"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "eth0"})
    report.results = {"gloo": {"error": None}, "nccl": {"error": NCCL_NO_INTERFACE}}
    assert collective_problem(report, "nccl", MEETING).startswith(
        "NCCL/RCCL has no interface to use (NCCL_SOCKET_IFNAME=ib matches none")
    report.facts["env"]["NCCL_SOCKET_IFNAME"] = None  # NCCL picked on its own and found nothing
    assert collective_problem(report, "nccl", MEETING) == (
        f"NCCL/RCCL found no usable interface (NCCL_SOCKET_IFNAME=unset): {NCCL_NO_INTERFACE} — "
        "set the node's `interface` to eth0, the NIC holding 10.78.0.3")
    report.results["nccl"] = {"error": "RuntimeError: torch sees no GPU (HIP_VISIBLE_DEVICES=, CUDA_VISIBLE_DEVICES=None)"}
    assert collective_problem(report, "nccl", MEETING) == (
        "the NCCL/RCCL all-reduce failed (NCCL_SOCKET_IFNAME=unset): RuntimeError: torch sees no GPU "
        "(HIP_VISIBLE_DEVICES=, CUDA_VISIBLE_DEVICES=None)")


def test_an_nccl_hang_is_reported_at_the_nccl_stage_on_every_node():
    nodes = [node(f"10.78.0.{i + 2}", rank=i, head=i == 0, nccl_rank=i,
                  env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}) for i in range(3)]
    for r in nodes:
        r.results = {"gloo": {"error": None}}  # then nothing: ncclCommInitRank never returned
    result = FabricResult(nodes, ["gloo", "nccl"], 29555)
    judge(result, MEETING)
    assert [r.problems for r in nodes] == [[
        "the NCCL/RCCL rendezvous did not complete within 100s (NCCL_SOCKET_IFNAME=eth0) — check that the nodes "
        f"reach each other on that interface; set the node's `interface` to eth0, the NIC holding {r.address}"]
        for r in nodes]


def test_an_actor_that_never_started_is_named_and_may_lack_a_gpu():
    nodes = [node("10.78.0.2", rank=0, head=True, nccl_rank=0, env={"GLOO_SOCKET_IFNAME": "eth0"}),
             NodeReport(rank=1, node_id="w", address="10.78.0.3", head=False, gpus=8, nccl_rank=1)]
    result = FabricResult(nodes, ["gloo", "nccl"], 29555)
    judge(result, None)
    assert not result.ok and nodes[0].problems == [] and result.waited == []
    assert result.failure_lines()[1:] == [
        "node 10.78.0.3: the check's Ray actor did not start within the timeout (or no GPU free for it: do model "
        "servers hold them?) — see the node's Ray logs (raylet.out in its Ray session directory)"]


def test_one_nodes_own_failure_is_named_and_the_waiting_nodes_listed():
    nodes = [node(f"10.78.0.{i + 2}", rank=i, head=i == 0, env={"GLOO_SOCKET_IFNAME": "eth0"}) for i in range(3)]
    nodes[0].results = {"gloo": {"error": CLIENTS_NEVER_CAME}}
    nodes[1].results = {"gloo": {"error": STORE_GONE}}
    nodes[2].results = {"gloo": {"error": STORE_UNREACHABLE}}
    result = FabricResult(nodes, ["gloo"], 29555)
    judge(result, Rendezvous("10.78.0.2", 29555, 3, (), 40))
    assert result.failure_lines() == [
        "cluster check of 3 nodes failed (versions; Gloo all-reduce through port 29555 on the head):",
        "node 10.78.0.4: could not reach the rendezvous at 10.78.0.2:29555 on the head — allow TCP port 29555 "
        "from 10.78.0.4 to 10.78.0.2, and check the route between them",
        "nodes that joined and waited for the ones above: 10.78.0.2, 10.78.0.3"]
    assert [n["problem"] is None for n in result.summary()["nodes"]] == [True, True, False]


def _member_in_a_process(rank: int, port: int, queue) -> None:
    meeting = Rendezvous(host="127.0.0.1", port=port, world_size=2, nccl_ranks=(1,), timeout_s=30)
    member = Member()
    queue.put((rank, member.gloo(meeting, rank), member.nccl(meeting, rank)))


def test_the_nccl_step_on_a_torch_without_nccl_fails_on_the_gpu_node_only():
    """Member's real Gloo and NCCL steps in two processes: rank 1 is in the NCCL group, rank 0 is not."""
    assert not dist.is_nccl_available(), "this test is for a CPU build of torch"
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    port = free_ports(1)[0]
    processes = [spawn.Process(target=_member_in_a_process, args=(rank, port, queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    results = dict((rank, (gloo, nccl)) for rank, gloo, nccl in (queue.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(30)
    assert results[0] == ({"error": None}, {"error": None})
    assert results[1][0] == {"error": None}
    report = node("10.78.0.3", nccl_rank=0, env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"})
    report.results = {"gloo": results[1][0], "nccl": results[1][1]}
    assert collective_problem(report, "nccl", MEETING) == (
        "this node's torch has no NCCL/RCCL backend (a CPU build?): the DCU profile needs the vendor image's torch")


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, named", [
    (["--address", "no-port", "--nodes", "1"], "ray_address"),
    (["--address", "10.0.0.1:6379", "--nodes", "0"], "--nodes"),
    (["--address", "10.0.0.1:6379", "--nodes", "2", "--port", "70000"], "--port"),
    (["--address", "10.0.0.1:6379", "--nodes", "2", "--timeout", "3"], "--timeout"),
])
def test_bad_usage_is_exit_2_naming_the_option(argv, named):
    done = subprocess.run([str(BIN / "node-runtime"), "cluster", "check", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and named in done.stderr and done.stdout == ""


def test_no_cluster_at_the_address_fails_within_the_timeout():
    port = free_ports(1)[0]
    done = subprocess.run([str(BIN / "node-runtime"), "cluster", "check", "--address", f"127.0.0.1:{port}", "--nodes", "1",
                           "--timeout", "10"], capture_output=True, text=True, timeout=40)
    assert done.returncode == 1 and done.stderr.startswith(f"error: Ray at 127.0.0.1:{port}") and "Traceback" not in done.stderr


# --- the command on a real Ray cluster across network namespaces --------------------------------


@cache
def vllm_here() -> str:
    """The vLLM this interpreter imports: the nodes' Ray workers run the same one, unless told otherwise."""
    import vllm

    return vllm.__version__


def run_check(cluster, *args: str, timeout: int = 60) -> tuple[subprocess.CompletedProcess, dict]:
    """The command as the program runs it on the head; the subprocess timeout is the proof it never hangs."""
    done = cluster.head.run([str(BIN / "node-runtime"), "cluster", "check", "--address", cluster.address,
                             *args, "--timeout", str(timeout)], check=False, timeout=timeout + 20)
    summary = json.loads(done.stdout) if done.stdout.strip() else {}
    return done, summary


def right_interfaces(host, i) -> dict:
    return {"GLOO_SOCKET_IFNAME": interface(host), "NCCL_SOCKET_IFNAME": interface(host), "VLLM_HOST_IP": host.address}


@pytest.mark.slow
class TestOnARightlyConfiguredCluster:
    """Three nodes, each with its own interface set; Ray is told the workers have a GPU each (there is none)."""

    @pytest.fixture(scope="class")
    @classmethod
    def cluster(cls):
        with ray_hosts(3, prefix=PREFIX, subnet=SUBNET, node_env=right_interfaces, gpus=[0, 1, 1]) as cluster:
            yield cluster

    def test_passes_and_reports_each_nodes_versions(self, cluster):
        done, summary = run_check(cluster, "--nodes", "3")
        assert done.returncode == 0, done.stderr
        here = {"python": platform.python_version(), "ray": ray.__version__, "vllm": vllm_here(), "torch": torch.__version__}
        assert summary["ok"] and summary["backends"] == ["gloo"]
        assert [(n["address"], n["head"], n["gloo_interface"], n["gloo_address"], n["problem"]) for n in summary["nodes"]] == [
            (h.address, h is cluster.head, interface(h), h.address, None) for h in cluster.hosts.hosts]
        assert all({key: n[key] for key in here} == here for n in summary["nodes"])
        assert "cluster check passed: 3 nodes" in done.stderr

    def test_nccl_on_a_torch_without_it_names_the_gpu_nodes(self, cluster):
        done, summary = run_check(cluster, "--nodes", "3", "--nccl")
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        workers = [h.address for h in cluster.hosts.hosts[1:]]
        assert [line for line in lines if line.startswith("node ")] == [
            f"node {w}: this node's torch has no NCCL/RCCL backend (a CPU build?): the DCU profile needs the vendor "
            "image's torch" for w in workers]
        assert summary["backends"] == ["gloo", "nccl"] and [n["gpus"] for n in summary["nodes"]] == [0, 1, 1]

    def test_a_firewalled_rendezvous_port_names_the_node_instead_of_hanging(self, cluster):
        blocked = cluster.hosts.hosts[2]
        rule = ["OUTPUT", "-p", "tcp", "--dport", "29555", "-j", "DROP"]
        blocked.run(["iptables", "-A", *rule])
        try:
            done, summary = run_check(cluster, "--nodes", "3", timeout=50)
        finally:
            blocked.run(["iptables", "-D", *rule])
        assert done.returncode == 1
        assert f"node {blocked.address}: could not reach the rendezvous at {cluster.head.address}:29555 on the head — " \
               f"allow TCP port 29555 from {blocked.address} to {cluster.head.address}" in done.stderr
        assert [n["address"] for n in summary["nodes"] if n["problem"]] == [blocked.address]

    def test_a_missing_node_is_reported(self, cluster):
        done, _ = run_check(cluster, "--nodes", "4")
        assert done.returncode == 1
        assert "Ray reports 3 alive nodes (10.79.0.2, 10.79.0.3, 10.79.0.4), expected 4" in done.stderr


@pytest.mark.slow
def test_a_node_whose_gloo_interface_does_not_exist_is_named_within_the_timeout():
    def env(host, i):
        return {**right_interfaces(host, i), **({"GLOO_SOCKET_IFNAME": "eth9"} if i == 2 else {})}

    with ray_hosts(3, prefix=PREFIX, subnet=SUBNET, node_env=env) as cluster:
        done, summary = run_check(cluster, "--nodes", "3")
    wrong = cluster.hosts.hosts[2]
    assert done.returncode == 1
    assert done.stderr.splitlines()[1:] == [
        "error: cluster check of 3 nodes failed (versions; Gloo all-reduce through port 29555 on the head):",
        f"node {wrong.address}: Gloo could not use interface eth9 (GLOO_SOCKET_IFNAME=eth9): no such device — "
        f"set the node's `interface` to {interface(wrong)}, the NIC holding {wrong.address}",
        "nodes that joined and waited for the ones above: 10.79.0.2, 10.79.0.3"]
    assert [n["gloo_address"] for n in summary["nodes"]] == ["10.79.0.2", "10.79.0.3", None]


@pytest.mark.slow
def test_a_node_importing_another_vllm_is_named_with_both_versions(tmp_path: Path):
    stub = tmp_path / "other-vllm" / "vllm"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('__version__ = "0.0.1+other"\n')

    def env(host, i):
        return {**right_interfaces(host, i), **({"PYTHONPATH": str(stub.parent)} if i == 1 else {})}

    with ray_hosts(3, prefix=PREFIX, subnet=SUBNET, node_env=env) as cluster:
        done, summary = run_check(cluster, "--nodes", "3")
    other = cluster.hosts.hosts[1]
    assert done.returncode == 1
    assert [line for line in done.stderr.splitlines() if line.startswith("node ")] == [
        f"node {other.address}: runs vLLM 0.0.1+other but the head {cluster.head.address} runs vLLM {vllm_here()} "
        "— every node must run the same node image"]
    assert [n["vllm"] for n in summary["nodes"]] == [vllm_here(), "0.0.1+other", vllm_here()]
