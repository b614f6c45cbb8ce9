"""The sync's wire protocol and the CLI's error path, without a network: plain functions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from node_runtime.modelstore.manifest import ManifestError
from node_runtime.modelstore.sync.wire import End, FileHeader, Plan, Progress, Result, parse_event, parse_stream_line


def test_stream_lines_round_trip_and_keep_their_json_shape():
    header = FileHeader(path="sub/model.safetensors", size=10, start=4, to=["root@10.0.0.2:22"])
    assert header.line() == b'{"path":"sub/model.safetensors","size":10,"start":4,"to":["root@10.0.0.2:22"]}\n'
    assert parse_stream_line(header.line()) == header
    assert End().line() == b'{"end":true}\n'
    assert isinstance(parse_stream_line(b'{"end": true}\n'), End)


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../b"])
def test_a_header_naming_a_path_outside_the_model_is_refused(path):
    line = f'{{"path": "{path}", "size": 1, "start": 0, "to": []}}'.encode()
    with pytest.raises(ManifestError, match=f"refusing unsafe path '{path}' in the stream"):
        parse_stream_line(line)


@pytest.mark.parametrize("line", [b"not json", b'{"path": "x", "size": -1, "start": 0, "to": []}', b'{"end": false}'])
def test_a_malformed_stream_line_is_a_manifest_error(line):
    with pytest.raises(ManifestError):
        parse_stream_line(line)


def test_events_parse_by_kind_and_anything_else_is_ignored():
    events = [Plan(node="a", needs={"x": 3}, up_to_date=False), Progress(node="a", bytes=5),
              Result(node="a", ok=True, bytes=5, message="received")]
    assert [parse_event(e.line()) for e in events] == events
    assert parse_event(b'{"node": "a", "event": "result", "ok": false, "bytes": 0, "message": "m"}').message == "m"
    assert parse_event(b"Warning: Permanently added '10.0.0.2' to the list of known hosts.") is None
    assert parse_event(b'{"node": "a", "event": "other"}') is None


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node_runtime.modelstore.cli", *args], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "NODE_RUNTIME_DEBUG"} | env)


def test_a_failed_operation_is_one_line_and_exit_1_with_the_traceback_only_when_debugging(tmp_path):
    missing = tmp_path / "no-such-root"
    plain = run_cli("list", "--model-root", str(missing))
    assert (plain.returncode, plain.stderr) == (1, f"error: model root {missing} does not exist\n")
    debug = run_cli("list", "--model-root", str(missing), NODE_RUNTIME_DEBUG="1")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ModelStoreError: model root" in debug.stderr


def test_bad_usage_is_exit_2_naming_the_option(tmp_path):
    result = run_cli("download", "--repo-id", "org/m", "--model-root", str(tmp_path), "--local-dir", str(tmp_path))
    assert result.returncode == 2 and "--local-dir only goes with --source local" in result.stderr
