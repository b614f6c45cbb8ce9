"""Bring-up, a change to the runtime package only, and a no-change re-apply on the simulated 3-host
cluster, for each way the node image reaches the workers (imageTransfer: stream, relay), side by side.

    .venv/bin/python -m bench.e2e.bench_e2e [--transfer stream --transfer relay] [--replicas N]   # as root
        [--link RATE] [--first-bring-up-only]

Same stack and applier as tests/e2e (three network namespaces with their own sshd and Docker engine,
the real Pulumi program applied through tests/e2e/apply.py), on the air-gapped tests' own subnet
(tests/e2e/air.py). Per step: the apply's wall time, to first token where containers changed, the
image step (the head's relay/push and the workers' fetch/stream and image ID, from the applier's
log), and the bytes each worker received on its link. The runtime change is made in a copy of the
recipes, never in the working tree; the harness's own build (on its builder) and load onto the head
are reported apart, as a real head builds in place. `--link` shapes every host's link, both ways, to
RATE (tc tbf, e.g. 250mbit): the head's then carries what all workers receive, as a head's uplink does
(the harness's load onto the head crosses it too, in the harness's column).
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from unittest import mock

from bench import harness
from components import image_distribution
from tests.e2e.air import AirSite, simulated_site
from tests.e2e.apply import apply
from tests.e2e.cluster import CLUSTER_NAME, DATA_ROOT, HOST_ROOT, MODEL_SOURCE, generate, stack_config, wait_until
from tests.support.tiny_model import build_tiny_llama

# The applier's log: "HH:MM:SS <op> <type> <name> (<seconds>s)".
_STEP = re.compile(r"^(\d\d:\d\d:\d\d) (\S+)\s+(\S+) (\S+) \(([\d.]+)s\)$")
IMAGE_STEPS = re.compile(rf"^{CLUSTER_NAME}-image-(relay|push|.*-(fetch|stream|id))$")


def image_step_seconds(log: Path, since: int) -> tuple[float, float]:
    """(distribution span, harness build+load) from the applier's log lines after line `since`."""
    spans, build = [], 0.0
    for line in log.read_text().splitlines()[since:]:
        # What ran: the end-of-apply deletes of replaced copies are bookkeeping, not the image step.
        if not (m := _STEP.match(line)) or m[2] not in ("create", "update", "create-replacement"):
            continue
        end, seconds = datetime.strptime(m[1], "%H:%M:%S"), float(m[5])
        if m[4] == f"{CLUSTER_NAME}-image-build":
            build += seconds
        elif IMAGE_STEPS.match(m[4]):
            spans.append((end - timedelta(seconds=seconds), end))
    if not spans:
        return 0.0, build
    return (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds(), build


class Measure:
    def __init__(self, site: AirSite, config: dict, secrets: dict):
        self.site, self.config, self.secrets = site, config, secrets
        self.rows: list[dict] = []

    def step(self, label: str, *, first_token: bool) -> dict:
        site, log = self.site, self.site.applier.site.log
        before = {h.name: site.received(h) for h in site.hosts[1:]}
        lines = len(log.read_text().splitlines()) if log.exists() else 0
        built = site.image_build_seconds
        started = time.monotonic()
        apply(self.config, site.applier, secrets=self.secrets)
        applied = time.monotonic() - started
        if first_token:
            wait_until(lambda: generate(f"http://{site.hosts[0].address}:8000", "Hello", 1), timeout=600,
                       what="first token")
        row = {"step": label, "apply_s": applied, "first_token_s": time.monotonic() - started if first_token else None,
               "changed": len(site.applier.log.changed()),
               "received_mb": [(site.received(h) - before[h.name]) / 1e6 for h in site.hosts[1:]]}
        row["image_step_s"], row["harness_build_load_s"] = image_step_seconds(log, lines)
        row["harness_build_s"] = site.image_build_seconds - built
        self.rows.append(row)
        print(row, flush=True)
        return row


def run(transfer: str, replicas: int, link: str | None, first_only: bool) -> tuple[list[dict], float | None]:
    with simulated_site(3, private_dirs=[HOST_ROOT], log_name=f"apply-{transfer}.log", copy_recipes=True) as site, \
            mock.patch.object(image_distribution, "PROJECT_DIR", site.project):
        head = site.hosts[0]
        if link:
            for host in site.hosts:
                site.cluster.sim.shape(host, rate=link)
        build_tiny_llama(site.on_host(head, HOST_ROOT, MODEL_SOURCE))
        config = {**stack_config(site.cluster, site.base_image), "imageTransfer": transfer}
        config["models"][0]["replicas"] = replicas
        measure = Measure(site, config, {"sshPrivateKey": site.cluster.sim.key.read_text()})
        measure.step("(a) first bring-up", first_token=True)
        runtime_layer = None if first_only else measure_changes(site, measure, transfer)
        site.applier.destroy()
        return measure.rows, runtime_layer


def measure_changes(site, measure: Measure, transfer: str) -> float | None:
    """Steps (b) and (c); returns the runtime layer's MB as the relay holds it (None when streamed)."""
    # A change to the runtime package only, in the recipes' copy.
    marker = site.project / "images/runtime/node_runtime/_bench_change.py"
    marker.write_text(f'"""A change to the runtime package only (bench/e2e)."""\nCHANGE = "{uuid.uuid4()}"\n')
    measure.step("(b) runtime package changed", first_token=True)
    measure.step("(c) no change", first_token=False)
    if transfer != "relay":
        return None
    layers = list(site.relay_layers(site.hosts[0], HOST_ROOT, f"{DATA_ROOT}/image-relay").values())
    if len(layers) != 2:
        return None
    first, second = layers
    return sum(size for digest, size in second.items() if digest not in first) / 1e6


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--transfer", action="append", choices=("stream", "relay"))
    parser.add_argument("--replicas", type=int, default=3, help="replicas of the tiny model (the e2e stack: 3)")
    parser.add_argument("--link", help="every host's link shaped to this rate (tc tbf), e.g. 250mbit")
    parser.add_argument("--first-bring-up-only", action="store_true", help="measure (a) only")
    options = parser.parse_args()
    with harness.report():
        results = {transfer: run(transfer, options.replicas, options.link, options.first_bring_up_only)
                   for transfer in options.transfer or ["stream", "relay"]}
        print(f"\n{options.replicas} replica(s), links {options.link or 'unshaped'}\n")
        print("| transfer | step | apply s | to first token s | image step s | harness build / build+load s "
              "| MB received per worker | resources changed |")
        print("|---|---|---|---|---|---|---|---|")
        for transfer, (rows, _) in results.items():
            for r in rows:
                token = f"{r['first_token_s']:.1f}" if r["first_token_s"] is not None else "—"
                received = " / ".join(f"{mb:.1f}" for mb in r["received_mb"])
                print(f"| {transfer} | {r['step']} | {r['apply_s']:.1f} | {token} | {r['image_step_s']:.1f} "
                      f"| {r['harness_build_s']:.1f} / {r['harness_build_load_s']:.1f} | {received} | {r['changed']} |")
        if "relay" in results and results["relay"][1] is not None:
            layer = results["relay"][1]
            changed = results["relay"][0][1]
            worst = max(changed["received_mb"])
            print(f"\nrelay, (b): the new layers are {layer:.1f} MB (compressed, as the relay holds them); "
                  f"the most a worker received is {worst:.1f} MB = {worst / layer:.2f} x; image step {changed['image_step_s']:.1f} s")


if __name__ == "__main__":
    main()
