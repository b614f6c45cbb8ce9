"""Distribute a model from the head to every worker, at the same absolute path, along a relay chain.

Pushing N copies from the head costs N times its link. Instead the head streams the model once,
into a chain: head → node1 → node2 → ... Each node's receiver (`node-runtime model _receive`,
run through ssh and the `--remote-exec` prefix) forwards every chunk to the next node *before*
writing it locally, so all links carry the data at the same time and N nodes take about as long
as one copy plus a fixed start-up cost per hop (bench/model_sync/RESULTS.md).

Hops: node k reaches node k+1 with `ssh -A`, authenticated by the head's agent, forwarded along
the chain. The relay key is loaded into a private ssh-agent on the head for the duration of
the sync (`--identity`) and never copied anywhere; a node can use it only while the sync's
connection through it is open. With `--remote-exec docker run ...`, pass the forwarded agent
into the container: `-v "$SSH_AUTH_SOCK:$SSH_AUTH_SOCK" -e SSH_AUTH_SOCK` (expanded on the node).

One ssh connection and one receiver per hop carry everything: planning, data, results. Only
what changed moves: the head sends its manifest down the chain; each node forwards it at once,
then answers (a `plan` event) which files fail the check (`--hash`) and how many bytes of each
it already holds in `{dir}/.partial/` from an interrupted run — so all nodes plan at the same
time. Once every node has answered, the stream carries each needed file once, from the smallest
offset any node needs; every node writes only what it lacks, appending to its partial file, and
renames the file into place when complete. Each node then checks the directory against the
manifest and only then writes its manifest (atomically). A node's manifest is removed before
its first changed byte is written, so a half-updated copy is never taken for a model.

A node that cannot keep its own copy (a full disk, a failed check) reports its failure and goes
on relaying, so the nodes after it still get theirs. A node that cannot be reached before it
has answered is reported as unreachable and the chain is joined around it.

Stream format (stdin of each receiver): one JSON line with the manifest, then per file one JSON
line `{"path", "size", "start", "to": [node labels]}` followed by `size - start` raw bytes, then
`{"end": true}`. Events flow back up the chain as JSON lines on stdout: `plan`, `progress` and
`result`, each naming its node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from node_runtime.modelstore.download import ModelStoreError, human_size
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

PARTIAL_DIR = ".partial"
CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 0.5
PLAN_TIMEOUT_S = 600


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Node:
    """`USER@HOST[:PORT]` as given on the command line (also its label in results)."""

    spec: str
    target: str
    port: int | None

    @classmethod
    def parse(cls, spec: str) -> Node:
        target, port = spec, None
        host_part = spec.rsplit("@", 1)[-1]
        if ":" in host_part:
            host, _, port_text = host_part.rpartition(":")
            if not port_text.isdigit() or not host:
                raise ValueError(f"--node {spec!r}: expected USER@HOST[:PORT]")
            target, port = spec[: len(spec) - len(port_text) - 1], int(port_text)
        if not host_part or spec.startswith("@"):
            raise ValueError(f"--node {spec!r}: expected USER@HOST[:PORT]")
        return cls(spec, target, port)


@dataclass
class SshSettings:
    remote_exec: str = ""
    ssh_config: Path | None = None
    agent_socket: str | None = None

    def command(self, node: Node, runtime_args: list[str]) -> list[str]:
        """ssh argv that runs `node-runtime model ARGS` on `node` through the remote-exec prefix."""
        argv = ["ssh", "-A", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15"]
        if self.ssh_config:
            argv += ["-F", str(self.ssh_config)]
        else:
            argv += ["-o", "StrictHostKeyChecking=accept-new"]
        if node.port:
            argv += ["-p", str(node.port)]
        remote = " ".join(filter(None, [self.remote_exec, "node-runtime model", shlex.join(runtime_args)]))
        return argv + [node.target, remote]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.agent_socket:
            env["SSH_AUTH_SOCK"] = self.agent_socket
        return env

    def relay_args(self) -> list[str]:
        """Options a receiver needs to reach the next node the same way."""
        args = ["--remote-exec", self.remote_exec]
        return args + (["--ssh-config", str(self.ssh_config)] if self.ssh_config else [])


@dataclass
class NodeResult:
    node: str
    ok: bool
    message: str
    bytes_received: int = 0


# ---------------------------------------------------------------- node side

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


def node_plan(model_dir: Path, manifest: Manifest, hash_mode: str) -> dict:
    """What this node lacks of `manifest` (`needs`), and whether its copy is complete already."""
    if not model_dir.is_dir():
        return {"needs": {f.path: 0 for f in manifest.files}, "up_to_date": False}
    try:
        complete = same_model(read_manifest(model_dir), manifest)
    except ManifestError:
        complete = False
    needs = plan_needs(model_dir, manifest, hash_mode)
    extra = verify_against(model_dir, manifest, "none").problems
    return {"needs": needs, "up_to_date": complete and not needs and not extra}


class EventWriter:
    """JSON event lines on a binary stream, safe from several threads."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.lock = threading.Lock()

    def write_line(self, line: bytes) -> None:
        with self.lock, contextlib.suppress(BrokenPipeError, OSError):  # upstream gone: nobody left to tell
            self.stream.write(line if line.endswith(b"\n") else line + b"\n")
            self.stream.flush()

    def emit(self, **event) -> None:
        self.write_line(json.dumps(event).encode())


def _relay_runtime_args(model_dir: Path, chain: list[Node], hash_mode: str, settings: SshSettings) -> list[str]:
    args = ["_receive", str(model_dir), "--as", chain[0].spec, "--hash", hash_mode, *settings.relay_args()]
    for node in chain[1:]:
        args += ["--next", node.spec]
    return args


class Downstream:
    """The rest of the chain, seen from the head or a node: one ssh process to the next node.

    Its stdin takes the stream; its stdout brings the events of every node after it, handed to
    `on_event` as they come. If the next node goes away before it has answered (so before any
    data was sent), it is reported unreachable and the chain is joined to the node after it.
    When the connection ends, every node after it without a result gets one that says why.
    """

    def __init__(self, me: str | None, chain: list[Node], model_dir: Path, hash_mode: str, settings: SshSettings,
                 on_event: Callable[[dict, bytes], None]):
        self.me, self.chain, self.model_dir, self.hash_mode, self.settings = me, list(chain), model_dir, hash_mode, settings
        self.on_event = on_event
        self.lock = threading.RLock()
        self.preamble = b""
        self.sent_data = False
        self.alive = False
        self.answered: set[str] = set()
        self.reported: set[str] = set()
        self.closed = threading.Event()
        self.process: subprocess.Popen | None = None

    def start(self, preamble: bytes) -> None:
        with self.lock:
            self.preamble = preamble
            self._connect()

    def send(self, data: bytes) -> None:
        """Pass on stream bytes after the preamble; dropped once the connection is gone."""
        with self.lock:
            self.sent_data = True
            self._write(data)

    def _write(self, data: bytes) -> None:
        if not self.alive:
            return
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.alive = False

    def _connect(self) -> None:
        argv = self.settings.command(self.chain[0], _relay_runtime_args(self.model_dir, self.chain, self.hash_mode, self.settings))
        process = subprocess.Popen(argv, env=self.settings.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        self.process, self.alive = process, True
        stderr: list[bytes] = []
        err_reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)
        err_reader.start()
        threading.Thread(target=self._read_events, args=(process, err_reader, stderr), daemon=True).start()
        self._write(self.preamble)

    def _read_events(self, process: subprocess.Popen, err_reader: threading.Thread, stderr: list[bytes]) -> None:
        rejoined = False
        try:
            rejoined = self._relay_events(process, err_reader, stderr)
        finally:
            if not rejoined:
                self.closed.set()

    def _relay_events(self, process: subprocess.Popen, err_reader: threading.Thread, stderr: list[bytes]) -> bool:
        """Hand on events until the connection ends; True if the chain was joined to a further node."""
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.answered.add(event.get("node"))
            if event.get("event") == "result":
                self.reported.add(event.get("node"))
            self.on_event(event, line)
        process.wait()
        err_reader.join(5)
        lines = [l for l in b"".join(stderr).decode(errors="replace").splitlines() if l.strip()]
        reason = lines[-1] if lines else f"ssh exited with code {process.returncode}"
        with self.lock:
            self.alive = False
            first = self.chain[0].spec
            unreachable = f"unreachable{f' from {self.me}' if self.me else ''}: {reason}"
            if first not in self.answered and not self.sent_data:
                self._report(first, unreachable)
                if len(self.chain) > 1:
                    self.chain = self.chain[1:]
                    self._connect()
                    return True
            for node in self.chain:
                if node.spec in self.reported:
                    continue
                if node.spec != first:
                    self._report(node.spec, f"no result: relay through {first} broke ({reason})")
                else:
                    self._report(node.spec, f"connection lost: {reason}" if first in self.answered else unreachable)
        return False

    def _report(self, node: str, message: str) -> None:
        self.reported.add(node)
        event = {"node": node, "event": "result", "ok": False, "bytes": 0, "message": message}
        self.on_event(event, json.dumps(event).encode())

    def finish(self) -> None:
        """End the stream and wait until every node after this one has reported."""
        with self.lock:
            self.sent_data = True
            process = self.process
            with contextlib.suppress(BrokenPipeError, OSError):
                process.stdin.close()
        self.closed.wait()

    def abort(self) -> None:
        with self.lock:
            self.sent_data = True
            self.process.kill()


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
            plan = node_plan(model_dir, manifest, hash_mode)
        except OSError as exc:
            failure, plan = f"checking its copy failed: {_describe(exc)}", None
            events.emit(node=me, event="result", ok=False, bytes=0, message=failure)
        else:
            events.emit(node=me, event="plan", **plan)
        old = None
        if plan and not plan["up_to_date"]:
            try:
                model_dir.mkdir(parents=True, exist_ok=True)
                old = read_manifest(model_dir)
                if not same_model(old, manifest):
                    (model_dir / MANIFEST_NAME).unlink()
            except ManifestError:
                pass
            except OSError as exc:
                failure = _describe(exc)
        last_progress = 0.0
        while True:
            header_line = stream.readline()
            if not header_line:
                raise EOFError
            if downstream:
                downstream.send(header_line)
            header = json.loads(header_line)
            if header.get("end"):
                break
            written, error = _receive_file(model_dir, header, failure is None and me in header["to"], stream, downstream)
            failure = failure or error
            received += written
            if time.monotonic() - last_progress > PROGRESS_INTERVAL_S:
                events.emit(node=me, event="progress", bytes=received)
                last_progress = time.monotonic()
        if plan is None:
            ok = False
        elif plan["up_to_date"]:
            events.emit(node=me, event="result", ok=True, bytes=0, message=f"up to date, verified ({hash_mode})")
            ok = True
        elif failure:
            events.emit(node=me, event="result", ok=False, bytes=received, message=failure)
            ok = False
        else:
            events.emit(node=me, event="progress", bytes=received)
            ok = _complete(model_dir, manifest, old, hash_mode, me, received, events)
    except EOFError:
        events.emit(node=me, event="result", ok=False, bytes=received,
                    message="transfer interrupted; run the sync again to resume")
        ok = False
    except (OSError, ManifestError) as exc:
        events.emit(node=me, event="result", ok=False, bytes=received, message=_describe(exc))
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
        events.emit(node=me, event="result", ok=True, bytes=received,
                    message=f"received {human_size(received)}, verified ({hash_mode})")
    else:
        events.emit(node=me, event="result", ok=False, bytes=received,
                    message=f"verification failed: {'; '.join(report.problems[:5])}")
    return report.ok


def _receive_file(model_dir: Path, header: dict, mine: bool, stream: BinaryIO,
                  downstream: Downstream | None) -> tuple[int, str | None]:
    """Relay one file's bytes and, if `mine`, append what this node lacks; (bytes written, local failure)."""
    relative, size, start = header["path"], header["size"], header["start"]
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ManifestError(f"refusing unsafe path {relative!r} in the stream")
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
            error, mine = f"writing {relative} failed: {_describe(exc)}", False
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
            error, mine = f"writing {relative} failed: {_describe(exc)}", False
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
        error = f"writing {relative} failed: {_describe(exc)}"
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


# ---------------------------------------------------------------- head side

@contextlib.contextmanager
def relay_agent(identity: Path | None) -> Iterator[str | None]:
    """A private ssh-agent holding the relay key for the sync (the caller's agent if no key)."""
    if identity is None:
        yield os.environ.get("SSH_AUTH_SOCK")
        return
    if not identity.is_file():
        raise ModelStoreError(f"--identity {identity} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix="node-runtime-agent-"))
    socket_path = tmp / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.02)
        added = subprocess.run(["ssh-add", "-q", str(identity)], env=dict(os.environ, SSH_AUTH_SOCK=str(socket_path)),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if added.returncode:
            raise ModelStoreError(f"cannot load --identity {identity} into an ssh-agent: {added.stderr.strip()}")
        yield str(socket_path)
    finally:
        agent.terminate()
        agent.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


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
    plans: dict[str, dict] = {}
    answers = threading.Condition()

    def on_event(event: dict, line: bytes) -> None:
        node = event.get("node")
        with answers:
            if event.get("event") == "plan":
                plans[node] = event
            elif event.get("event") == "progress":
                progress.advanced(node, event["bytes"])
            elif event.get("event") == "result":
                results.setdefault(node, NodeResult(node, event["ok"], event["message"], event.get("bytes", 0)))
            answers.notify_all()

    downstream = Downstream(None, nodes, model_dir, hash_mode, settings, on_event)
    downstream.start(manifest.model_dump_json().encode() + b"\n")
    everyone = {n.spec for n in nodes}
    with answers:
        if not answers.wait_for(lambda: everyone <= plans.keys() | results.keys(), timeout=PLAN_TIMEOUT_S):
            for node in everyone - plans.keys() - results.keys():
                results[node] = NodeResult(node, False, f"no answer within {PLAN_TIMEOUT_S} s while checking its copy")
            downstream.abort()
        receiving = [n.spec for n in nodes if n.spec in plans and n.spec not in results and not plans[n.spec]["up_to_date"]]
    sizes = {f.path: f.size for f in manifest.files}
    for node in receiving:
        progress.started(node, sum(sizes[path] - held for path, held in plans[node]["needs"].items()))
    try:
        _send_files(model_dir, manifest, {node: plans[node]["needs"] for node in receiving}, downstream)
    except ModelStoreError:
        downstream.abort()
        raise
    downstream.send(b'{"end": true}\n')
    downstream.finish()
    return [results.get(n.spec) or NodeResult(n.spec, False, "no result (the relay ended early)") for n in nodes]


def _send_files(model_dir: Path, manifest: Manifest, needs: dict[str, dict[str, int]], downstream: Downstream) -> None:
    """Each file some node needs, once, from the smallest offset any of them needs."""
    for entry in manifest.files:
        to = [node for node, wanted in needs.items() if entry.path in wanted]
        if not to or not downstream.alive:
            continue
        start = min(needs[node][entry.path] for node in to)
        downstream.send(json.dumps({"path": entry.path, "size": entry.size, "start": start, "to": to}).encode() + b"\n")
        with (model_dir / entry.path).open("rb") as f:
            f.seek(start)
            remaining = entry.size - start
            while remaining and downstream.alive:
                chunk = f.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    raise ModelStoreError(f"{model_dir / entry.path} shrank while being sent; verify the head's copy")
                downstream.send(chunk)
                remaining -= len(chunk)


def print_results(results: list[NodeResult], out=sys.stdout) -> None:
    for r in results:
        print(f"{r.node}: {'ok' if r.ok else 'FAILED'} — {r.message}", file=out)
