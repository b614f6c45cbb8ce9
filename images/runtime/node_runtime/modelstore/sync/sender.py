"""The head's side of the sync: send the manifest down the chain, wait for every node's plan,
then stream each file some node needs, once, and collect one result per node."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from node_runtime.modelstore.manifest import Manifest, read_manifest, verify_against
from node_runtime.modelstore.store import ModelStoreError
from node_runtime.modelstore.sync.transport import Downstream, Node, SshSettings
from node_runtime.modelstore.sync.wire import CHUNK_BYTES, End, Event, FileHeader, Plan, Progress, Result

PLAN_TIMEOUT_S = 600


@dataclass
class NodeResult:
    node: str
    ok: bool
    message: str
    bytes_received: int = 0

    def __str__(self) -> str:
        return f"{self.node}: {'ok' if self.ok else 'FAILED'} — {self.message}"


@dataclass
class SyncProgress:
    """Hooks the CLI uses to show progress; the defaults do nothing."""

    started: Callable[[str, int], None] = lambda node, total: None
    advanced: Callable[[str, int], None] = lambda node, done: None


def sync(model_dir: Path, nodes: list[Node], settings: SshSettings, hash_mode: str = "sample",
         progress: SyncProgress | None = None) -> list[NodeResult]:
    """Bring every node's copy of `model_dir` in line with the head's; one result per node."""
    progress = progress or SyncProgress()
    model_dir = Path(os.path.abspath(model_dir))
    manifest = read_manifest(model_dir)
    local = verify_against(model_dir, manifest, "none")
    if not local.ok:
        raise ModelStoreError(f"refusing to distribute {model_dir}: {local.problems[0]}; run `node-runtime model verify` on the head")
    results: dict[str, NodeResult] = {}
    plans: dict[str, Plan] = {}
    answers = threading.Condition()

    def on_event(event: Event, line: bytes) -> None:
        with answers:
            if isinstance(event, Plan):
                plans[event.node] = event
            elif isinstance(event, Progress):
                progress.advanced(event.node, event.bytes)
            elif isinstance(event, Result):
                results.setdefault(event.node, NodeResult(event.node, event.ok, event.message, event.bytes))
            answers.notify_all()

    downstream = Downstream(None, nodes, model_dir, hash_mode, settings, on_event)
    downstream.start(manifest.model_dump_json().encode() + b"\n")
    everyone = {n.spec for n in nodes}
    with answers:
        if not answers.wait_for(lambda: everyone <= plans.keys() | results.keys(), timeout=PLAN_TIMEOUT_S):
            for node in everyone - plans.keys() - results.keys():
                results[node] = NodeResult(node, False, f"no answer within {PLAN_TIMEOUT_S} s while checking its copy")
            downstream.abort()
        receiving = [n.spec for n in nodes if n.spec in plans and n.spec not in results and not plans[n.spec].up_to_date]
    sizes = {f.path: f.size for f in manifest.files}
    for node in receiving:
        progress.started(node, sum(sizes[path] - held for path, held in plans[node].needs.items()))
    try:
        _send_files(model_dir, manifest, {node: plans[node].needs for node in receiving}, downstream)
    except ModelStoreError:
        downstream.abort()
        raise
    downstream.send(End().line())
    downstream.finish()
    return [results.get(n.spec) or NodeResult(n.spec, False, "no result (the relay ended early)") for n in nodes]


def _send_files(model_dir: Path, manifest: Manifest, needs: dict[str, dict[str, int]], downstream: Downstream) -> None:
    """Each file some node needs, once, from the smallest offset any of them needs."""
    for entry in manifest.files:
        to = [node for node, wanted in needs.items() if entry.path in wanted]
        if not to or not downstream.alive:
            continue
        start = min(needs[node][entry.path] for node in to)
        downstream.send(FileHeader(path=entry.path, size=entry.size, start=start, to=to).line())
        with (model_dir / entry.path).open("rb") as f:
            f.seek(start)
            remaining = entry.size - start
            while remaining and downstream.alive:
                chunk = f.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    raise ModelStoreError(f"{model_dir / entry.path} shrank while being sent; verify the head's copy")
                downstream.send(chunk)
                remaining -= len(chunk)
