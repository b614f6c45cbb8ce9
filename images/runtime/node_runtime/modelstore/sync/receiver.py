"""A node's side of the sync (`node-runtime model _receive`): answer what it lacks, relay the
stream to the rest of the chain, keep what it lacks, verify, then write its manifest."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import BinaryIO

from node_runtime.modelstore.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    check_file,
    parse_manifest,
    read_manifest,
    save_manifest,
    verify_against,
)
from node_runtime.modelstore.store import PARTIAL_DIR, human_size
from node_runtime.modelstore.sync.transport import Downstream, EventWriter, Node, SshSettings
from node_runtime.modelstore.sync.wire import CHUNK_BYTES, End, FileHeader, Plan, Progress, Result, parse_stream_line

PROGRESS_INTERVAL_S = 0.5


def describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def plan_needs(model_dir: Path, manifest: Manifest, hash_mode: str) -> dict[str, int]:
    """Files of `manifest` this node must receive, each with the bytes it already holds."""
    needs = {}
    for entry in manifest.files:
        if check_file(model_dir, entry, hash_mode) is None:
            continue
        partial = model_dir / PARTIAL_DIR / entry.path
        held = partial.stat().st_size if partial.is_file() else 0
        needs[entry.path] = held if held <= entry.size else 0
    return needs


def same_model(a: Manifest, b: Manifest) -> bool:
    return a.model_dump(exclude={"created_at"}) == b.model_dump(exclude={"created_at"})


def node_plan(me: str, model_dir: Path, manifest: Manifest, hash_mode: str) -> Plan:
    """What this node lacks of `manifest` (`needs`), and whether its copy is complete already."""
    if not model_dir.is_dir():
        return Plan(node=me, needs={f.path: 0 for f in manifest.files}, up_to_date=False)
    try:
        complete = same_model(read_manifest(model_dir), manifest)
    except ManifestError:
        complete = False
    needs = plan_needs(model_dir, manifest, hash_mode)
    extra = verify_against(model_dir, manifest, "none").problems
    return Plan(node=me, needs=needs, up_to_date=complete and not needs and not extra)


def receive(model_dir: Path, me: str, chain: list[Node], settings: SshSettings, hash_mode: str,
            stream: BinaryIO, events: EventWriter) -> bool:
    """Node side of the sync: plan, forward the stream to the rest of the chain, keep what this node needs."""
    downstream = Downstream(me, chain, model_dir, hash_mode, settings, lambda event, line: events.write_line(line)) if chain else None
    received = 0
    failure = None  # why this node's own copy failed; it still relays
    try:
        preamble = stream.readline()
        if not preamble:
            raise EOFError
        if downstream:
            downstream.start(preamble)
        manifest = parse_manifest(preamble, "the stream's manifest")
        try:
            plan = node_plan(me, model_dir, manifest, hash_mode)
        except OSError as exc:
            failure, plan = f"checking its copy failed: {describe(exc)}", None
            events.send(Result(node=me, ok=False, message=failure))
        else:
            events.send(plan)
        old = None
        if plan and not plan.up_to_date:
            try:
                model_dir.mkdir(parents=True, exist_ok=True)
                old = read_manifest(model_dir)
                if not same_model(old, manifest):
                    (model_dir / MANIFEST_NAME).unlink()
            except ManifestError:
                pass
            except OSError as exc:
                failure = describe(exc)
        last_progress = 0.0
        while True:
            header_line = stream.readline()
            if not header_line:
                raise EOFError
            if downstream:
                downstream.send(header_line)
            header = parse_stream_line(header_line)
            if isinstance(header, End):
                break
            written, error = _receive_file(model_dir, header, failure is None and me in header.to, stream, downstream)
            failure = failure or error
            received += written
            if time.monotonic() - last_progress > PROGRESS_INTERVAL_S:
                events.send(Progress(node=me, bytes=received))
                last_progress = time.monotonic()
        if plan is None:
            ok = False
        elif plan.up_to_date:
            events.send(Result(node=me, ok=True, message=f"up to date, verified ({hash_mode})"))
            ok = True
        elif failure:
            events.send(Result(node=me, ok=False, bytes=received, message=failure))
            ok = False
        else:
            events.send(Progress(node=me, bytes=received))
            ok = _complete(model_dir, manifest, old, hash_mode, me, received, events)
    except EOFError:
        events.send(Result(node=me, ok=False, bytes=received, message="transfer interrupted; run the sync again to resume"))
        ok = False
    except (OSError, ManifestError) as exc:
        events.send(Result(node=me, ok=False, bytes=received, message=describe(exc)))
        ok = False
    if downstream:
        downstream.finish()
    return ok


def _complete(model_dir: Path, manifest: Manifest, old: Manifest | None, hash_mode: str, me: str, received: int,
              events: EventWriter) -> bool:
    """After the stream: drop files the new manifest no longer lists, verify, then write the manifest."""
    if old:
        listed = {f.path for f in manifest.files}
        for stale in (f.path for f in old.files if f.path not in listed):
            (model_dir / stale).unlink(missing_ok=True)
    report = verify_against(model_dir, manifest, hash_mode)
    if report.ok:
        save_manifest(model_dir, manifest)
        _remove_empty_dirs(model_dir / PARTIAL_DIR)
        message = f"received {human_size(received)}, verified ({hash_mode})"
    else:
        message = f"verification failed: {'; '.join(report.problems[:5])}"
    events.send(Result(node=me, ok=report.ok, bytes=received, message=message))
    return report.ok


def _receive_file(model_dir: Path, header: FileHeader, mine: bool, stream: BinaryIO,
                  downstream: Downstream | None) -> tuple[int, str | None]:
    """Relay one file's bytes and, if `mine`, append what this node lacks; (bytes written, local failure)."""
    relative, size, start = header.path, header.size, header.start
    skip = 0
    out = None
    error = None
    partial = model_dir / PARTIAL_DIR / relative
    if mine:
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            held = partial.stat().st_size if partial.is_file() else 0
            if held > size:
                held = 0
            if held < start:  # this stream cannot complete our partial file; the next sync starts it over
                partial.unlink(missing_ok=True)
                mine = False
            else:
                out = partial.open("r+b" if partial.exists() else "wb")
                out.seek(held)
                out.truncate()
                skip = held - start
        except OSError as exc:
            error, mine = f"writing {relative} failed: {describe(exc)}", False
    remaining = size - start
    written = 0
    while remaining:
        chunk = stream.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            _close(out, sync=True)  # keep what arrived: the next sync resumes from it
            raise EOFError
        remaining -= len(chunk)
        if downstream:
            downstream.send(chunk)
        if out is None:
            continue
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        try:
            out.write(chunk[skip:] if skip else chunk)
        except OSError as exc:
            error, mine = f"writing {relative} failed: {describe(exc)}", False
            _close(out)
            out = None
            continue
        written += len(chunk) - skip
        skip = 0
    try:
        _close(out, sync=True)
        if mine:
            final = model_dir / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
    except OSError as exc:
        error = f"writing {relative} failed: {describe(exc)}"
    return written, error


def _close(out: BinaryIO | None, sync: bool = False) -> None:
    if out is None:
        return
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(out.close)
        if sync:
            out.flush()
            os.fsync(out.fileno())


def _remove_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
