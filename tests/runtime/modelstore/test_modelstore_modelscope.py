"""`node-runtime model download --source modelscope` with the real modelscope SDK against a local
server speaking ModelScope's HTTP API (modelscope_server.py), run as the real command line."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelscope_server import ModelScopeRepo, ModelScopeServer
from node_runtime.modelstore.manifest import read_manifest, verify_manifest

pytest.importorskip("modelscope", reason="requirements-test.txt installs the modelscope SDK")

TOKEN = "ms-secret-test-token"
rng = random.Random(7)
MASTER = {
    "configuration.json": b'{"framework": "pytorch", "task": "text-generation"}',
    "config.json": b'{"model_type": "qwen2", "hidden_size": 16}',
    "model.safetensors": rng.randbytes(300_000),
    "original/consolidated.pth": rng.randbytes(20_000),
}
V1 = {"configuration.json": b'{"framework": "pytorch"}', "config.json": b'{"model_type": "qwen2", "hidden_size": 8}',
      "model.safetensors": rng.randbytes(150_000)}


@pytest.fixture
def hub(tmp_path):
    server = ModelScopeServer(repos={
        "org/tiny-model": ModelScopeRepo(revisions={"master": MASTER, "v1.0.0": V1}),
        "org/private-model": ModelScopeRepo(revisions={"master": {"config.json": b"{}"}}, token=TOKEN),
    })
    server.start()
    server.home = tmp_path / "home"
    yield server
    server.stop()


def ms_env(hub: ModelScopeServer, **extra: str) -> dict:
    """The endpoint through the SDK's own variable; no token, and a private HOME for the SDK's state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSCOPE")}
    return env | {"MODELSCOPE_ENDPOINT": hub.url, "HOME": str(hub.home)} | extra


def download_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "node_runtime.modelstore.cli", "download", "--source", "modelscope",
            "--model-root", str(root), *args]


def run_download(hub, root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(download_argv(root, *args), capture_output=True, text=True, timeout=120, env=env or ms_env(hub))


def file_gets(hub, since: int = 0) -> list[dict]:
    return [r for r in hub.requests[since:] if r["method"] == "GET" and r["path"].endswith("/repo")]


def test_download_writes_complete_model_with_manifest(hub, tmp_path):
    root = tmp_path / "models"
    result = run_download(hub, root, "--repo-id", "org/tiny-model")
    assert result.returncode == 0, result.stderr
    assert f"downloaded: {root / 'tiny-model'} (org/tiny-model@master" in result.stdout
    model = root / "tiny-model"
    manifest = read_manifest(model)
    assert (manifest.source, manifest.repo_id, manifest.revision) == ("modelscope", "org/tiny-model", "master")
    assert {f.path: f.size for f in manifest.files} == {p: len(d) for p, d in MASTER.items()}
    assert all((model / p).read_bytes() == d for p, d in MASTER.items())
    assert verify_manifest(model, "full").ok
    assert not (root / ".staging" / "tiny-model").exists()

    before = len(hub.requests)
    again = run_download(hub, root, "--repo-id", "org/tiny-model")
    assert again.returncode == 0 and "already present" in again.stdout
    assert hub.requests[before:] == []


def test_a_pinned_revision_gets_that_revisions_content(hub, tmp_path):
    root = tmp_path / "models"
    pinned = run_download(hub, root, "--repo-id", "org/tiny-model", "--revision", "v1.0.0", "--name", "tiny-v1")
    latest = run_download(hub, root, "--repo-id", "org/tiny-model")
    assert pinned.returncode == 0 and latest.returncode == 0, pinned.stderr + latest.stderr
    assert read_manifest(root / "tiny-v1").revision == "v1.0.0"
    assert {p.name: p.read_bytes() for p in (root / "tiny-v1").iterdir() if p.is_file() and p.name != ".manifest.json"} == V1
    assert (root / "tiny-model" / "config.json").read_bytes() == MASTER["config.json"]
    assert all("Revision=v1.0.0" in r["query"] for r in file_gets(hub)[:len(V1)])


NOT_FOUND = {
    "missing repo": (["--repo-id", "org/missing"], "repository org/missing not found on {url}; check --repo-id"),
    "missing revision": (["--repo-id", "org/tiny-model", "--revision", "v9"],
                         "revision 'v9' not found in org/tiny-model on {url} (branches: master; tags: v1.0.0); check --revision"),
}


@pytest.mark.parametrize("case", NOT_FOUND)
def test_not_found_is_one_clear_line_and_leaves_nothing(hub, tmp_path, case):
    args, message = NOT_FOUND[case]
    root = tmp_path / "models"
    result = run_download(hub, root, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(url=hub.url) in lines[0], result.stderr
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    assert file_gets(hub) == []


def test_private_repo_needs_the_token_from_the_environment(hub, tmp_path):
    root = tmp_path / "models"
    denied = run_download(hub, root, "--repo-id", "org/private-model")
    assert denied.returncode == 1
    assert "org/private-model not found" in denied.stderr and "MODELSCOPE_API_TOKEN" in denied.stderr
    allowed = run_download(hub, root, "--repo-id", "org/private-model", env=ms_env(hub, MODELSCOPE_API_TOKEN=TOKEN))
    assert allowed.returncode == 0, allowed.stderr
    assert (root / "private-model" / "config.json").read_bytes() == b"{}"
    assert TOKEN not in allowed.stdout + allowed.stderr
    assert all(r["auth"] for r in file_gets(hub))


def test_allow_and_ignore_patterns(hub, tmp_path):
    root = tmp_path / "models"
    result = run_download(hub, root, "--repo-id", "org/tiny-model", "--allow", "*.json", "--allow", "*.safetensors",
                          "--ignore", "configuration.json")
    assert result.returncode == 0, result.stderr
    assert [f.path for f in read_manifest(root / "tiny-model").files] == ["config.json", "model.safetensors"]
    assert sorted(r["query"].rsplit("FilePath=", 1)[1] for r in file_gets(hub)) == ["config.json", "model.safetensors"]


def test_the_endpoint_option_wins_over_the_environment(hub, tmp_path):
    root = tmp_path / "models"
    result = run_download(hub, root, "--repo-id", "org/tiny-model", "--modelscope-endpoint", hub.url,
                          env=ms_env(hub, MODELSCOPE_ENDPOINT="http://127.0.0.1:9"))
    assert result.returncode == 0, result.stderr
    assert read_manifest(root / "tiny-model").revision == "master"


def test_a_broken_connection_resumes_within_the_run(hub, tmp_path):
    hub.cut_after_bytes = 100_000
    root = tmp_path / "models"
    result = run_download(hub, root, "--repo-id", "org/tiny-model", "--allow", "model.safetensors")
    assert result.returncode == 0, result.stderr
    gets = file_gets(hub)
    assert [(r["range"], r["sent"]) for r in gets] == [(None, 100_000), ("bytes=100000-", 200_000)]
    assert (root / "tiny-model" / "model.safetensors").read_bytes() == MASTER["model.safetensors"]


def test_a_killed_download_resumes_from_the_bytes_it_kept(hub, tmp_path):
    hub.repos["org/big-model"] = ModelScopeRepo(revisions={"master": {"config.json": b"{}", "model.safetensors": os.urandom(3_000_000)}})
    hub.throttle_bytes_per_s = 1_000_000
    root = tmp_path / "models"
    process = subprocess.Popen(download_argv(root, "--repo-id", "org/big-model"), env=ms_env(hub),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = root / ".staging" / "big-model" / "model.safetensors.incomplete"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (partial.is_file() and partial.stat().st_size >= 1_000_000):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    held = partial.stat().st_size
    assert 0 < held < 3_000_000
    assert (root / ".staging" / "big-model" / "config.json").is_file()

    hub.throttle_bytes_per_s = None
    first_run = len(hub.requests)
    result = run_download(hub, root, "--repo-id", "org/big-model")
    assert result.returncode == 0, result.stderr
    assert [(r["query"].rsplit("FilePath=", 1)[1], r["range"]) for r in file_gets(hub, first_run)] == [
        ("model.safetensors", f"bytes={held}-")]
    assert hub.sent_bytes(first_run) == 3_000_000 - held
    assert verify_manifest(root / "big-model", "full").ok


def test_modelscope_endpoint_set_after_the_sdk_was_imported_is_honoured(hub, tmp_path):
    # The SDK reads MODELSCOPE_ENDPOINT when a client is made, which the download does each time.
    script = tmp_path / "late_endpoint.py"
    script.write_text(
        "import os, sys\nfrom pathlib import Path\nimport modelscope.hub.api\n"
        "from node_runtime.modelstore.download import DownloadRequest, download\n"
        "os.environ['MODELSCOPE_ENDPOINT'] = sys.argv[1]\n"
        "request = DownloadRequest(source='modelscope', repo_id='org/tiny-model', model_root=Path(sys.argv[2]))\n"
        "print(download(request).path)\n")
    env = {k: v for k, v in ms_env(hub).items() if k != "MODELSCOPE_ENDPOINT"}
    result = subprocess.run([sys.executable, str(script), hub.url, str(tmp_path / "models")], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "models" / "tiny-model")
    assert len(file_gets(hub)) == len(MASTER)
