"""`node-runtime model sync` between simulated hosts: network namespaces with their own sshd.

The head and each worker see their own copy of MODEL_ROOT at the same absolute path (a
per-host mount namespace, see tests/support/netns.py), so what arrives on a worker arrived
over ssh. The receivers run the installed `node-runtime` through `--remote-exec`, which here
only puts the venv on PATH (in production it is `docker run ... IMAGE`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.netns import simulated_hosts

pytestmark = pytest.mark.slow
MODEL_ROOT = "/srv/modelstore-test-models"
MODEL = f"{MODEL_ROOT}/tiny"
REMOTE_EXEC = f"env PATH={Path(sys.executable).parent}:/usr/bin:/bin"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with simulated_hosts(4, workdir=tmp_path_factory.mktemp("hosts"), subnet="10.77.0.0/24", prefix="mst",
                         private_dirs=[MODEL_ROOT], rate="80mbit") as cluster:
        # Hops authenticate with the head's forwarded agent only: no IdentityFile here.
        cluster.hop_config = cluster.workdir / "hop_ssh_config"
        cluster.hop_config.write_text("".join(
            f"Host {h.address}\n  User root\n  UserKnownHostsFile {cluster.known_hosts}\n  StrictHostKeyChecking yes\n  ConnectTimeout 3\n"
            for h in cluster.hosts))
        head = cluster.hosts[0]
        model = head.private_dirs[MODEL_ROOT] / "tiny"
        model.mkdir(parents=True)
        for i in range(3):
            (model / f"model-0000{i}.safetensors").write_bytes(os.urandom(3_000_000))
        (model / "config.json").write_text('{"model_type": "llama"}')
        head.run([sys.executable, "-m", "node_runtime.modelstore.cli", "download", "--source", "local",
                  "--repo-id", "org/tiny", "--local-dir", MODEL, "--model-root", MODEL_ROOT])
        yield cluster


def sync_argv(cluster, workers) -> list[str]:
    argv = [sys.executable, "-m", "node_runtime.modelstore.cli", "sync", MODEL, "--identity", str(cluster.key),
            "--ssh-config", str(cluster.hop_config), "--remote-exec", REMOTE_EXEC]
    for w in workers:
        argv += ["--node", w if isinstance(w, str) else w.ssh_target]
    return argv


def run_sync(cluster, workers, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return cluster.hosts[0].run(sync_argv(cluster, workers), check=False, env=env, timeout=180, **kwargs)


def worker_verify(host, mode="full"):
    return host.run([sys.executable, "-m", "node_runtime.modelstore.cli", "verify", MODEL, "--hash", mode], check=False)


def test_sync_relays_to_every_worker_and_verifies(cluster):
    workers = cluster.hosts[1:3]
    result = run_sync(cluster, workers)
    assert result.returncode == 0, result.stderr
    for w in workers:
        assert f"{w.ssh_target}: ok — received 8.6 MiB, verified (sample)" in result.stdout
        assert worker_verify(w).returncode == 0
        assert (w.private_dirs[MODEL_ROOT] / "tiny" / "config.json").exists()
    # the fourth host was not a target: its copy of the path stays empty
    assert not (cluster.hosts[3].private_dirs[MODEL_ROOT] / "tiny").exists()

    again = run_sync(cluster, workers)
    assert again.returncode == 0 and again.stdout.count("up to date") == 2


def test_corrupted_file_is_caught_by_verify_and_repaired_alone(cluster):
    worker = cluster.hosts[1]
    assert run_sync(cluster, [worker]).returncode == 0
    shard = worker.private_dirs[MODEL_ROOT] / "tiny" / "model-00001.safetensors"
    with shard.open("r+b") as f:
        f.write(b"\0" * 64)
    caught = worker_verify(worker, "sample")
    assert caught.returncode == 1
    assert caught.stdout.strip() == "corrupt: model-00001.safetensors (sampled content hash differs)"

    repaired = run_sync(cluster, [worker])
    assert repaired.returncode == 0, repaired.stderr
    assert "received 2.9 MiB" in repaired.stdout  # only the damaged shard moved
    assert worker_verify(worker).returncode == 0


def test_interrupted_transfer_resumes(cluster):
    worker = cluster.hosts[3]
    cluster.shape(worker, rate="8mbit")
    try:
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        process = cluster.hosts[0].popen(sync_argv(cluster, [worker]), env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        partial = worker.private_dirs[MODEL_ROOT] / "tiny" / ".partial"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) < 1_500_000:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        held = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
        assert held >= 1_500_000
        assert worker_verify(worker, "none").returncode == 1, "an interrupted copy must not look complete"
    finally:
        cluster.shape(worker, rate="80mbit")
    resumed = run_sync(cluster, [worker])
    assert resumed.returncode == 0, resumed.stderr
    line = next(l for l in resumed.stdout.splitlines() if l.startswith(worker.ssh_target))
    received_mib = float(line.split("received ")[1].split(" MiB")[0])
    assert received_mib * 2**20 < 9_000_020 - held + 2**20 / 10  # only what was missing moved
    assert worker_verify(worker).returncode == 0
    assert not partial.exists()


def test_unreachable_worker_is_named_and_fails_the_command(cluster):
    reachable = cluster.hosts[2]
    result = run_sync(cluster, [reachable, "root@10.77.0.250"])
    assert result.returncode == 1
    assert f"root@10.77.0.250: FAILED — unreachable from {reachable.ssh_target}" in result.stdout
    assert "sync of /srv/modelstore-test-models/tiny failed on root@10.77.0.250" in result.stderr
    assert f"{reachable.ssh_target}: ok" in result.stdout


def test_chain_is_joined_around_an_unreachable_worker(cluster):
    behind = cluster.hosts[1]
    shard = behind.private_dirs[MODEL_ROOT] / "tiny" / "model-00002.safetensors"
    shard.unlink(missing_ok=True)  # data must flow through the joined chain, whatever ran before
    result = run_sync(cluster, ["root@10.77.0.250", behind])
    assert result.returncode == 1
    assert "root@10.77.0.250: FAILED — unreachable:" in result.stdout
    assert f"{behind.ssh_target}: ok — received " in result.stdout
    assert worker_verify(behind).returncode == 0
