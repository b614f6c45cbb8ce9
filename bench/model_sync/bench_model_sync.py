"""Model distribution: `node-runtime model sync` (relay chain) vs one plain copy vs sequential rsync.

Simulated hosts (tests/support/netns.py): a head and 4 workers in network namespaces with their
own sshd, every link shaped with tc (both directions), each host with its own copy of the model
root at the same absolute path. For N = 1, 2, 4 workers it times, side by side in one run:
  - one plain copy: `rsync -a` of the model to one worker (the floor for any method),
  - sequential rsync to each worker in turn (what the original guide does),
  - `node-runtime model sync` to the N workers (relay chain, verified at each node),
  - the same sync again once every worker is up to date: no data moves, so this is the sync's
    fixed cost (start-up of every hop, planning, verification, results).
Every copy starts from empty destinations. Run as root from the repo root:
    .venv/bin/python -m bench.model_sync.bench_model_sync [--rate 100mbit] [--mib 48] [--workers 1 2 4]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from bench import harness
from tests.support.netns import simulated_hosts

MODEL_ROOT = "/srv/bench-model-sync"
MODEL = f"{MODEL_ROOT}/bench-model"
CLI = [sys.executable, "-m", "node_runtime.modelstore.cli"]


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--rate", default="100mbit", help="tc rate of every host link (each direction)")
    parser.add_argument("--mib", type=int, default=48, help="model size in MiB (4 shards)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 3, 4], help="values of N to run")
    args = parser.parse_args()
    workdir = Path("/tmp/bench-model-sync")
    shutil.rmtree(workdir, ignore_errors=True)
    with harness.report(), simulated_hosts(5, workdir=workdir, subnet="10.78.0.0/24", prefix="bms", private_dirs=[MODEL_ROOT],
                                           rate=args.rate) as cluster:
        head, workers = cluster.hosts[0], cluster.hosts[1:]
        model = head.private_dirs[MODEL_ROOT] / "bench-model"
        model.mkdir(parents=True)
        for i in range(4):
            (model / f"model-0000{i}.safetensors").write_bytes(os.urandom(args.mib * 2**20 // 4))
        head.run(CLI + ["download", "--source", "local", "--repo-id", "bench/bench-model", "--local-dir", MODEL, "--model-root", MODEL_ROOT])
        hop_config = workdir / "hop_ssh_config"
        hop_config.write_text("".join(f"Host {h.address}\n  User root\n  UserKnownHostsFile {cluster.known_hosts}\n  StrictHostKeyChecking yes\n" for h in cluster.hosts))
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}

        def clear() -> None:
            for w in workers:
                shutil.rmtree(w.private_dirs[MODEL_ROOT] / "bench-model", ignore_errors=True)

        def timed(argvs: list[list[str]], fresh: bool = True) -> float:
            if fresh:
                clear()
            start = time.perf_counter()
            for argv in argvs:
                head.run(argv, env=env, timeout=600)
            return time.perf_counter() - start

        def rsync(w) -> list[str]:
            return ["rsync", "-a", "-e", f"ssh -F {cluster.ssh_config}", f"{MODEL}/", f"{w.ssh_target}:{MODEL}/"]

        def relay(n: int) -> list[str]:
            argv = CLI + ["sync", MODEL, "--identity", str(cluster.key), "--ssh-config", str(hop_config),
                          "--remote-exec", f"env PATH={Path(sys.executable).parent}:/usr/bin:/bin"]
            for w in workers[:n]:
                argv += ["--node", w.ssh_target]
            return argv

        one_copy = timed([rsync(workers[0])])
        print(f"model {args.mib} MiB in 4 shards, links {args.rate} each way")
        print(f"one plain copy (rsync to 1 worker): {one_copy:.2f} s")
        print(f"{'N':>2}  {'sequential rsync':>17}  {'ratio':>6}  {'node-runtime sync':>18}  {'ratio':>6}  {'re-sync, up to date':>20}")
        for n in args.workers:
            sequential = timed([rsync(w) for w in workers[:n]])
            ours = timed([relay(n)])
            for w in workers[:n]:
                assert w.run(CLI + ["verify", MODEL, "--hash", "full"], check=False).returncode == 0, f"{w.name} not verified"
            fixed = timed([relay(n)], fresh=False)
            print(f"{n:>2}  {sequential:>15.2f} s  {sequential / one_copy:>5.2f}x  {ours:>16.2f} s  {ours / one_copy:>5.2f}x  {fixed:>18.2f} s")


if __name__ == "__main__":
    main()
