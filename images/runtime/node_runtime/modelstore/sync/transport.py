"""How the sync reaches the next node: one ssh connection running its receiver, and the relay agent.

`Downstream` is the rest of the chain seen from the head or a node; events coming back from it
are handed on as they arrive. Nothing here looks into a model: that is the receiver's and the
sender's job.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from node_runtime.modelstore.store import ModelStoreError
from node_runtime.modelstore.sync.wire import Event, Message, Result, parse_event

OnEvent = Callable[[Event, bytes], None]


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


def receiver_args(model_dir: Path, chain: list[Node], hash_mode: str, settings: SshSettings) -> list[str]:
    """`node-runtime model` arguments of the receiver on `chain[0]`, which relays to the rest."""
    args = ["_receive", str(model_dir), "--as", chain[0].spec, "--hash", hash_mode, *settings.relay_args()]
    for node in chain[1:]:
        args += ["--next", node.spec]
    return args


class EventWriter:
    """Event lines on a binary stream, safe from several threads."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.lock = threading.Lock()

    def write_line(self, line: bytes) -> None:
        with self.lock, contextlib.suppress(BrokenPipeError, OSError):  # upstream gone: nobody left to tell
            self.stream.write(line if line.endswith(b"\n") else line + b"\n")
            self.stream.flush()

    def send(self, event: Message) -> None:
        self.write_line(event.line())


class Downstream:
    """The rest of the chain, seen from the head or a node: one ssh process to the next node.

    Its stdin takes the stream; its stdout brings the events of every node after it, handed to
    `on_event` as they come. If the next node goes away before it has answered (so before any
    data was sent), it is reported unreachable and the chain is joined to the node after it.
    When the connection ends, every node after it without a result gets one that says why.
    """

    def __init__(self, me: str | None, chain: list[Node], model_dir: Path, hash_mode: str, settings: SshSettings,
                 on_event: OnEvent):
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
        argv = self.settings.command(self.chain[0], receiver_args(self.model_dir, self.chain, self.hash_mode, self.settings))
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
            event = parse_event(line)
            if event is None:
                continue
            self.answered.add(event.node)
            if isinstance(event, Result):
                self.reported.add(event.node)
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
        event = Result(node=node, ok=False, message=message)
        self.on_event(event, event.line())

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
