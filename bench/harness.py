"""What every benchmark shares: its command line, the lifetime of the processes it starts, its report's header and footer.

    args = harness.parser(__doc__).parse_args()         # the bench's own options added first
    with harness.report():                              # the header now, the footer at the end
        with harness.helper_processes("nrb-") as work:  # every Process started inside is stopped on the way out
            ...
        print(...)                                      # the bench's own figures

The header says when (UTC), what (the commit, and whether tracked files differ from it), where (CPUs,
the machine's load average at the start, Python) and the command line, so that a report pasted into a
RESULTS.md can be rerun and judged on its own; the footer gives the load average at the end, as
other engineers' jobs on the shared machine change during a run.
"""

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from tests.support.processes import each_started

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str) -> argparse.ArgumentParser:
    """The bench's module docstring as its --help, laid out as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


@contextmanager
def helper_processes(prefix: str) -> Iterator[Path]:
    """A fresh work directory; every tests.support.processes.Process started inside the block (a Ray head,
    vLLM, gateways, upstreams, routers) is stopped when the block ends or fails, the last started first,
    each by its own process group; then the directory is removed.

    A process is registered as it starts (processes.each_started), so one whose readiness wait times
    out is stopped too instead of loading the shared machine after the bench has failed.
    """
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix=prefix))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stack.enter_context(each_started(lambda process: stack.callback(process.stop)))
        yield work


def commit(root: Path = ROOT) -> str:
    """The checkout's commit, and whether its tracked files differ from it (untracked files are not counted)."""
    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:  # e.g. a copy without .git, or git refusing a checkout owned by another user
        return f"unknown ({(head.stderr.strip() or 'git failed').splitlines()[0]})"
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
    state = f"working tree dirty (tracked files changed: {len(changed)})" if changed else "working tree clean"
    return f"{head.stdout.strip()}, {state}"


def load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg()) + " (1, 5, 15 min)"


def header(argv: list[str]) -> list[str]:
    return [
        f"when:    {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
        f"what:    commit {commit()}",
        f"where:   {os.cpu_count()} CPUs, load average {load_average()} at the start, Python {platform.python_version()}",
        f"command: {shlex.join(argv)}",
    ]


def footer(elapsed_s: float) -> str:
    return (f"end:     {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC, after {elapsed_s:.0f} s;"
            f" load average {load_average()} at the end")


@contextmanager
def report() -> Iterator[None]:
    """Prints the header, then the footer when the block ends, also when it fails. The command line is
    sys.orig_argv: as typed, the interpreter and `-m bench....` included."""
    started = time.monotonic()
    print("\n".join(header(sys.orig_argv)) + "\n", flush=True)
    try:
        yield
    finally:
        print("\n" + footer(time.monotonic() - started), flush=True)
