"""Bring-up time to first token, and a no-change re-apply, on the simulated 3-host cluster.

    sudo .venv/bin/python bench/e2e/bench_e2e.py            # from the repository root, as root

Same cluster and applier as tests/e2e (three network namespaces with their own sshd and Docker
engine, the real Pulumi program applied through tests/e2e/apply.py). The node image tarball
comes from the cache when its inputs are unchanged; the time to build it is reported apart.
Prints one markdown table row per measure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e.apply import apply  # noqa: E402
from tests.e2e.cluster import e2e_cluster, generate, wait_until  # noqa: E402
from tests.runtime.serving.tiny_model import build_tiny_llama  # noqa: E402


def main() -> None:
    with e2e_cluster(build_tiny_llama) as e2e:
        started = time.monotonic()
        apply(e2e.config, e2e.applier, secrets=e2e.secrets)
        applied = time.monotonic() - started
        wait_until(lambda: generate(e2e.gateway, "Hello", 1), timeout=300, what="first token")
        first_token = time.monotonic() - started

        started = time.monotonic()
        apply(e2e.config, e2e.applier, secrets=e2e.secrets)
        reapply = time.monotonic() - started
        changed = e2e.applier.log.changed()
        e2e.applier.destroy()

    print("| measure | seconds |")
    print("|---|---|")
    print(f"| node image build (0 = cached tarball) | {e2e.image_build_seconds:.1f} |")
    print(f"| apply (all resources created, incl. image build/load/stream) | {applied:.1f} |")
    print(f"| bring-up to first token | {first_token:.1f} |")
    print(f"| no-change re-apply ({len(changed)} resources changed) | {reapply:.1f} |")
    print(f"| ratio re-apply / bring-up | {reapply / first_token:.3f} |")
    print()


if __name__ == "__main__":
    main()
