"""The one waiting helper of the tests and benchmarks: poll a probe until it holds, and give up at
once when a process it depends on has died, naming that process, its exit code and its log's tail
(a crashed sshd or dockerd then reads as what it is, not as a bare timeout).

    from tests.support.waiting import Watched, wait_until

    wait_until(lambda: port_open(22), timeout=15, what="sshd listening",
               process=Watched(popen, "sshd of sim0", log=hostdir / "sshd.log"))

`process` is one process or several: a `subprocess.Popen`, a `Watched` (a Popen with a name and its
log file), or anything with `proc`, `name` and `log_path` (tests.support.processes.Process).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class WaitFailed(AssertionError):
    """The probe never held within the timeout."""


class ProcessDied(RuntimeError):
    """A watched process exited while the probe was still being waited for."""


@dataclass(frozen=True)
class Watched:
    """A child process a wait depends on: its name in messages and, if any, the file its output goes to."""

    popen: subprocess.Popen
    name: str
    log: Path | None = None

    def tail(self, lines: int = 30) -> str:
        if self.log is None or not Path(self.log).exists():
            return ""
        return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-lines:])


def _watched(process: Any) -> list[Watched]:
    if process is None:
        return []
    if isinstance(process, Watched):
        return [process]
    if isinstance(process, subprocess.Popen):
        return [Watched(process, f"process {process.pid} ({_argv0(process)})")]
    if hasattr(process, "proc") and hasattr(process, "name"):  # tests.support.processes.Process
        return [Watched(process.proc, process.name, getattr(process, "log_path", None))]
    if isinstance(process, Iterable) and not isinstance(process, (str, bytes)):
        return [watched for item in process for watched in _watched(item)]
    raise TypeError(f"not a process to watch: {process!r}")


def _argv0(popen: subprocess.Popen) -> str:
    args = popen.args
    return str(args if isinstance(args, (str, bytes)) else args[0])


def _with_tails(message: str, watched: list[Watched]) -> str:
    for item in watched:
        tail = item.tail()
        if tail:
            message += f"\n--- {item.name}, last lines of its log ---\n{tail}"
    return message


def wait_until(probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.2,
               process: Any = None) -> T:
    """probe()'s first truthy value, polled every `interval` s for `timeout` s (probed at least once).

    Raises ProcessDied as soon as one of `process` has exited (checked before each probe), and
    WaitFailed (an AssertionError) with the probe's last value once `timeout` has passed.
    """
    watched = _watched(process)
    deadline = time.monotonic() + timeout
    while True:
        for item in watched:
            code = item.popen.poll()
            if code is not None:
                raise ProcessDied(_with_tails(f"{what}: {item.name} exited with {code}", [item]))
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitFailed(_with_tails(f"{what}: not within {timeout:g}s (last: {last!r})", watched))
        time.sleep(interval)
