"""bench/harness.py: the benchmarks' --help, the header and footer of their reports, and the lifetime
of the processes they start."""

import os
import platform
import subprocess
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone

import psutil
import pytest

from bench import harness
from tests.support import processes
from tests.support.waiting import wait_until
from tests.support.processes import Process

DOC = """A benchmark.

Its layout:
  - kept as written."""


def git(repo, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", *argv],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_the_module_doc_is_the_help_as_written():
    assert DOC in harness.parser(DOC).format_help()


def test_the_header_says_when_what_where_and_the_command_line():
    argv = [".venv/bin/python", "-m", "bench.gateway.compare_versions", "--variant", 'access log={"access_log_percent": 100}']
    when, what, where, command = harness.header(argv)
    stamp = datetime.strptime(when, "when:    %Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(seconds=5)
    assert what.startswith(f"what:    commit {git(harness.ROOT, 'rev-parse', '--short', 'HEAD')}, working tree ")
    assert where.startswith(f"where:   {os.cpu_count()} CPUs, load average ")
    assert where.endswith(f" at the start, Python {platform.python_version()}")
    # Quoted as a shell takes it back: the report's command can be pasted to rerun the bench.
    assert command == ("command: .venv/bin/python -m bench.gateway.compare_versions"
                       " --variant 'access log={\"access_log_percent\": 100}'")


def test_the_commit_and_whether_tracked_files_differ_from_it(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "bench.py").write_text("one")
    git(tmp_path, "add", "bench.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    short = git(tmp_path, "rev-parse", "--short", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked: not what ran")
    assert harness.commit(tmp_path) == f"{short}, working tree clean"
    (tmp_path / "bench.py").write_text("two")
    assert harness.commit(tmp_path) == f"{short}, working tree dirty (tracked files changed: 1)"


def test_no_commit_outside_a_checkout_says_why(tmp_path):
    assert harness.commit(tmp_path).startswith("unknown (fatal: not a git repository")


def test_the_report_has_the_header_first_and_the_footer_last_also_when_the_bench_fails(capsys):
    with pytest.raises(RuntimeError, match="measurement failed"):
        with harness.report():
            print("the bench's figures")
            raise RuntimeError("measurement failed")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["when", "what", "where", "command"]
    assert "the bench's figures" in lines
    assert lines[-1].startswith("end:     ") and lines[-1].endswith(" at the end")
    assert "load average" in lines[-1]


def sleeper(work, name: str) -> Process:
    """A shell with a child of its own: the whole process group must go, not just its leader."""
    return Process(name, ["sh", "-c", "sleep 60 & wait"], dict(os.environ), work)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("fails", [False, True], ids=["ends", "fails"])
def test_every_process_started_inside_is_stopped_and_the_work_directory_removed(fails):
    started = []
    with pytest.raises(RuntimeError) if fails else nullcontext():
        with harness.helper_processes("nr-test-") as work:
            assert work.is_dir()
            for name in ("first", "second"):
                process = sleeper(work, name)
                process.start()
                process.wait_until(lambda: psutil.Process(process.proc.pid).children(), timeout=10)
                started.append(process)
            pids = [pid for process in started
                    for pid in (process.proc.pid, *(child.pid for child in psutil.Process(process.proc.pid).children()))]
            assert len(pids) == 4 and all(alive(pid) for pid in pids)
            if fails:  # e.g. a readiness wait that timed out after the process had started
                raise RuntimeError("the second process never answered")
    assert [process.proc.poll() for process in started] == [-15, -15]  # stopped by SIGTERM, not left to run
    # a signal is delivered after killpg returns: the group's last member may take a moment to exit
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10, what="the processes' children gone")
    assert not work.exists()
    assert processes._on_start == []  # a process started after the bench is not the harness's to stop

