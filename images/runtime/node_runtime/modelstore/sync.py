"""Distribute a model from the head to every worker, at the same absolute path, along a relay chain.

Pushing N copies from the head costs N times its link. Instead the head streams the model once,
into a chain: head → node1 → node2 → ... Each node's receiver (`node-runtime model _receive`,
run through ssh and the `--remote-exec` prefix) forwards every chunk to the next node *before*
writing it locally, so all links carry the data at the same time and N nodes take about as long
as one copy (bench/model_sync/RESULTS.md).

Hops: node k reaches node k+1 with `ssh -A`, authenticated by the head's agent, forwarded along
the chain. The relay key is loaded into a private ssh-agent on the head for the duration of
the sync (`--identity`) and never copied anywhere; a node can use it only while the sync's
connection through it is open. With `--remote-exec docker run ...`, pass the forwarded agent
into the container: `-v "$SSH_AUTH_SOCK:$SSH_AUTH_SOCK" -e SSH_AUTH_SOCK` (expanded on the node).

Only what changed moves: first the head sends its manifest to every node (in parallel) and each
answers which files fail the check (`--hash`) and how many bytes of each it already holds in
`{dir}/.partial/` from an interrupted run. The stream then carries each needed file once, from
the smallest offset any node needs; every node writes only what it lacks, appending to its
partial file, and renames the file into place when complete. Each node then checks the directory
against the manifest and only then writes its manifest (atomically). A node's manifest is removed
before its first changed byte is written, so a half-updated copy is never taken for a model.

Stream format (stdin of each receiver): one JSON line with the manifest, then per file one JSON
line `{"path", "size", "start", "to": [node labels]}` followed by `size - start` raw bytes, then
`{"end": true}`. Events flow back up the chain as JSON lines on stdout: `progress` and `result`.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


def node_plan(model_dir: Path, manifest_json: bytes, hash_mode: str) -> dict:
    manifest = parse_manifest(manifest_json, "the head's manifest")
    try:
        complete = same_model(read_manifest(model_dir), manifest)
    except ManifestError:
        complete = False
    needs = plan_needs(model_dir, manifest, hash_mode) if model_dir.is_dir() else {f.path: 0 for f in manifest.files}
    extra = verify_against(model_dir, manifest, "none").problems if model_dir.is_dir() else []
    return {"needs": needs, "up_to_date": complete and not needs and not extra}


class EventWriter:
    """JSON event lines on a binary stream, safe from several threads."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.lock = threading.Lock()

    def write_line(self, line: bytes) -> None:
        with self.lock:
            self.stream.write(line if line.endswith(b"\n") else line + b"\n")
            self.stream.flush()

    def emit(self, **event) -> None:
        self.write_line(json.dumps(event).encode())


class NextHop:
    """The ssh process to the next node: its stdin takes the stream, its stdout brings events back."""

    def __init__(self, node: Node, runtime_args: list[str], settings: SshSettings, on_event: Callable[[dict, bytes], None]):
        self.node = node
        self.process = subprocess.Popen(
            settings.command(node, runtime_args), env=settings.env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.alive = True
        self.reported: set[str] = set()
        self.stderr = b""
        self.reader = threading.Thread(target=self._read_events, args=(on_event,), daemon=True)
        self.reader.start()
        self.err_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.err_reader.start()

    def _read_events(self, on_event: Callable[[dict, bytes], None]) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "result":
                self.reported.add(event["node"])
            on_event(event, line)

    def _read_stderr(self) -> None:
        self.stderr = self.process.stderr.read()

    def write(self, data: bytes) -> None:
        if not self.alive:
            return
        try:
            self.process.stdin.write(data)
        except (BrokenPipeError, OSError):
            self.alive = False

    def finish(self, timeout: float | None = None) -> int:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.close()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(5)
        self.err_reader.join(5)
        return code

    def failure_reason(self) -> str:
        lines = [l for l in self.stderr.decode(errors="replace").splitlines() if l.strip()]
        return lines[-1] if lines else f"ssh exited with code {self.process.returncode}"


def _relay_runtime_args(model_dir: Path, chain: list[Node], hash_mode: str, settings: SshSettings) -> list[str]:
    args = ["_receive", str(model_dir), "--as", chain[0].spec, "--hash", hash_mode, *settings.relay_args()]
    for node in chain[1:]:
        args += ["--next", node.spec]
    return args


def receive(model_dir: Path, me: str, chain: list[Node], settings: SshSettings, hash_mode: str,
            stream: BinaryIO, events: EventWriter) -> bool:
    """Node side of the sync: forward the stream to the rest of the chain, keep what this node needs."""
    next_hop = None
    if chain:
        next_hop = NextHop(chain[0], _relay_runtime_args(model_dir, chain, hash_mode, settings), settings,
                           lambda event, line: events.write_line(line))
    received = 0
    last_progress = 0.0
    try:
        preamble = stream.readline()
        if not preamble:
            raise EOFError
        manifest = parse_manifest(preamble, "the stream's manifest")
        if next_hop:
            next_hop.write(preamble)
        model_dir.mkdir(parents=True, exist_ok=True)
        try:
            old = read_manifest(model_dir)
        except ManifestError:
            old = None
        if old and not same_model(old, manifest):
            (model_dir / MANIFEST_NAME).unlink()
        while True:
            header_line = stream.readline()
            if not header_line:
                raise EOFError
            if next_hop:
                next_hop.write(header_line)
            header = json.loads(header_line)
            if header.get("end"):
                break
            written = _receive_file(model_dir, header, me in header["to"], stream, next_hop)
            received += written
            if time.monotonic() - last_progress > PROGRESS_INTERVAL_S:
                events.emit(node=me, event="progress", bytes=received)
                last_progress = time.monotonic()
        events.emit(node=me, event="progress", bytes=received)
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
        ok = report.ok
    except EOFError:
        events.emit(node=me, event="result", ok=False, bytes=received,
                    message="transfer interrupted; run the sync again to resume")
        ok = False
    except (OSError, ManifestError) as exc:
        events.emit(node=me, event="result", ok=False, bytes=received, message=f"{type(exc).__name__}: {exc}")
        ok = False
    if next_hop:
        next_hop.finish()
        missing = [n.spec for n in chain if n.spec not in next_hop.reported]
        for node in missing:
            reason = f"unreachable from {me}: {next_hop.failure_reason()}" if node == chain[0].spec else f"relay through {chain[0].spec} broke"
            events.emit(node=node, event="result", ok=False, bytes=0, message=reason)
    return ok


def _receive_file(model_dir: Path, header: dict, mine: bool, stream: BinaryIO, next_hop: NextHop | None) -> int:
    relative, size, start = header["path"], header["size"], header["start"]
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ManifestError(f"refusing unsafe path {relative!r} in the stream")
    skip = 0
    out = None
    if mine:
        partial = model_dir / PARTIAL_DIR / relative
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
    remaining = size - start
    written = 0
    try:
        while remaining:
            chunk = stream.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise EOFError
            remaining -= len(chunk)
            if next_hop:
                next_hop.write(chunk)
            if out:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                out.write(chunk[skip:] if skip else chunk)
                written += len(chunk) - skip
                skip = 0
    finally:
        if out:
            out.flush()
            os.fsync(out.fileno())
            out.close()
    if mine:
        final = model_dir / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(model_dir / PARTIAL_DIR / relative, final)
    return written


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


def _plan_node(node: Node, model_dir: Path, manifest_json: bytes, hash_mode: str, settings: SshSettings) -> dict | NodeResult:
    argv = settings.command(node, ["_plan", str(model_dir), "--hash", hash_mode])
    try:
        done = subprocess.run(argv, input=manifest_json, capture_output=True, env=settings.env(), timeout=600)
    except subprocess.TimeoutExpired:
        return NodeResult(node.spec, False, "no answer within 600 s while checking its copy")
    stderr = [l for l in done.stderr.decode(errors="replace").splitlines() if l.strip()]
    if done.returncode == 255:
        return NodeResult(node.spec, False, f"unreachable: {stderr[-1] if stderr else 'ssh failed'}")
    if done.returncode:
        return NodeResult(node.spec, False, f"checking its copy failed: {stderr[-1] if stderr else f'exit {done.returncode}'}")
    try:
        return json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return NodeResult(node.spec, False, "checking its copy gave no answer (is node-runtime reachable through --remote-exec?)")


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
    manifest_json = manifest.model_dump_json().encode()
    with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
        plans = list(pool.map(lambda n: _plan_node(n, model_dir, manifest_json, hash_mode, settings), nodes))
    results: dict[str, NodeResult] = {}
    chain: list[Node] = []
    needs: dict[str, dict[str, int]] = {}
    sizes = {f.path: f.size for f in manifest.files}
    for node, plan in zip(nodes, plans):
        if isinstance(plan, NodeResult):
            results[node.spec] = plan
        elif plan["up_to_date"]:
            results[node.spec] = NodeResult(node.spec, True, f"up to date, verified ({hash_mode})")
        else:
            chain.append(node)
            needs[node.spec] = plan["needs"]
            progress.started(node.spec, sum(sizes[p] - held for p, held in plan["needs"].items()))
    if chain:
        results.update(_stream_chain(model_dir, manifest, chain, needs, settings, hash_mode, progress))
    return [results[n.spec] for n in nodes]


def _stream_chain(model_dir: Path, manifest: Manifest, chain: list[Node], needs: dict[str, dict[str, int]],
                  settings: SshSettings, hash_mode: str, progress: SyncProgress) -> dict[str, NodeResult]:
    results: dict[str, NodeResult] = {}

    def on_event(event: dict, line: bytes) -> None:
        if event.get("event") == "progress":
            progress.advanced(event["node"], event["bytes"])
        elif event.get("event") == "result":
            results[event["node"]] = NodeResult(event["node"], event["ok"], event["message"], event.get("bytes", 0))

    hop = NextHop(chain[0], _relay_runtime_args(model_dir, chain, hash_mode, settings), settings, on_event)
    hop.write(manifest.model_dump_json().encode() + b"\n")
    for entry in manifest.files:
        to = [n.spec for n in chain if entry.path in needs[n.spec]]
        if not to or not hop.alive:
            continue
        start = min(needs[n][entry.path] for n in to)
        hop.write(json.dumps({"path": entry.path, "size": entry.size, "start": start, "to": to}).encode() + b"\n")
        with (model_dir / entry.path).open("rb") as f:
            f.seek(start)
            remaining = entry.size - start
            while remaining and hop.alive:
                chunk = f.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    raise ModelStoreError(f"{model_dir / entry.path} shrank while being sent; verify the head's copy")
                hop.write(chunk)
                remaining -= len(chunk)
    hop.write(b'{"end": true}\n')
    hop.finish()
    reason = hop.failure_reason()
    for node in chain:
        if node.spec not in results:
            first = node is chain[0]
            results[node.spec] = NodeResult(node.spec, False, f"unreachable: {reason}" if first else f"no result: relay through {chain[0].spec} broke ({reason})")
    return results


def print_results(results: list[NodeResult], out=sys.stdout) -> None:
    for r in results:
        print(f"{r.node}: {'ok' if r.ok else 'FAILED'} — {r.message}", file=out)
