"""`node-runtime model download|verify|list|remove` with huggingface_hub's real client against a
local server speaking the Hub protocol (HF_ENDPOINT), run as the real command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.hub_server import HubRepo, HubServer
from node_runtime.modelstore.manifest import MANIFEST_NAME, read_manifest, verify_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_repo_files(weights_bytes: int = 300_000) -> dict[str, bytes]:
    """A small model repository: config, tokenizer, two weight shards."""
    rng = __import__("random").Random(4)
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 16}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "model-00001-of-00002.safetensors": rng.randbytes(weights_bytes),
        "model-00002-of-00002.safetensors": rng.randbytes(weights_bytes // 2),
        "original/consolidated.pth": rng.randbytes(20_000),
    }


@pytest.fixture
def hub():
    server = HubServer(repos={
        "org/tiny-model": HubRepo(files=make_repo_files(), commit=COMMIT, branches=("main", "v1")),
        "org/private-model": HubRepo(files={"config.json": b"{}"}, commit="f" * 40, token="hf_secret_test_token"),
    })
    server.url = server.start()
    yield server
    server.stop()


def run_cli(*args: str, env: dict | None = None, user: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "node_runtime.modelstore.cli", *args]
    if user:
        # The user may read what the interpreter needs wherever it lives (pyenv's: under /root), never write there.
        argv = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def hub_env(hub: HubServer, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return env | {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(Path(hub.home))} | extra


@pytest.fixture(autouse=True)
def hf_home(hub, tmp_path):
    hub.home = tmp_path / "hf_home"


def test_download_from_hub_writes_complete_model_with_manifest(hub, tmp_path):
    root = tmp_path / "models"
    result = run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root), env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    model = root / "tiny-model"
    manifest = read_manifest(model)
    assert manifest.revision == COMMIT and manifest.source == "huggingface" and manifest.repo_id == "org/tiny-model"
    files = make_repo_files()
    assert {f.path: f.size for f in manifest.files} == {p: len(d) for p, d in files.items()}
    assert all((model / p).read_bytes() == d for p, d in files.items())
    assert verify_manifest(model, "full").ok
    assert not (root / ".staging" / "tiny-model").exists()

    again = run_cli("download", "--repo-id", "org/tiny-model", "--revision", COMMIT[:10], "--model-root", str(root), env=hub_env(hub))
    assert again.returncode == 0 and "already present" in again.stdout


def test_allow_and_ignore_patterns_and_pinned_tag(hub, tmp_path):
    root = tmp_path / "models"
    result = run_cli("download", "--repo-id", "org/tiny-model", "--revision", "v1", "--model-root", str(root),
                     "--allow", "*.json", "--allow", "*.safetensors", "--ignore", "tokenizer.json", env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    paths = [f.path for f in read_manifest(root / "tiny-model").files]
    assert paths == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert read_manifest(root / "tiny-model").revision == COMMIT


def test_token_comes_from_env_and_never_appears_in_output(hub, tmp_path):
    root = tmp_path / "models"
    denied = run_cli("download", "--repo-id", "org/private-model", "--model-root", str(root), env=hub_env(hub))
    assert denied.returncode == 1
    assert "org/private-model not found" in denied.stderr and "HF_TOKEN" in denied.stderr
    allowed = run_cli("download", "--repo-id", "org/private-model", "--model-root", str(root),
                      env=hub_env(hub, HF_TOKEN="hf_secret_test_token"))
    assert allowed.returncode == 0, allowed.stderr
    assert "hf_secret_test_token" not in allowed.stdout + allowed.stderr
    assert any(r["auth"] for r in hub.requests)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo-id", "org/missing"], "repository org/missing not found on"),
        (["--repo-id", "org/tiny-model", "--revision", "no-such-branch"], "revision 'no-such-branch' not found in org/tiny-model"),
    ],
)
def test_not_found_is_one_clear_line_and_leaves_nothing(hub, tmp_path, args, message):
    root = tmp_path / "models"
    result = run_cli("download", *args, "--model-root", str(root), env=hub_env(hub))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []


def test_unknown_source_is_bad_usage_naming_the_flag(hub, tmp_path):
    result = run_cli("download", "--source", "s3", "--repo-id", "org/tiny-model", "--model-root", str(tmp_path), env=hub_env(hub))
    assert result.returncode == 2
    assert "--source" in result.stderr and "huggingface" in result.stderr


def test_not_enough_free_disk_is_checked_before_downloading(hub, tmp_path):
    hub.repos["org/big-model"] = HubRepo(files={"model.safetensors": b"\0" * 3_000_000}, commit="b" * 40)
    root = tmp_path / "small-disk"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], check=True)
    try:
        result = run_cli("download", "--repo-id", "org/big-model", "--model-root", str(root), env=hub_env(hub))
        assert result.returncode == 1
        assert f"not enough free disk at {root}" in result.stderr
        assert not any(r["method"] == "GET" and "/resolve/" in r["path"] for r in hub.requests)
        assert not (root / "big-model").exists()
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_permission_denied_names_the_model_root(hub):
    # pytest's tmp dirs are private to root; the unprivileged user needs a path it can reach.
    parent = Path(tempfile.mkdtemp(prefix="modelstore-perm-"))
    try:
        parent.chmod(0o755)
        root = parent / "root-owned"
        root.mkdir(mode=0o755)
        result = run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root),
                         env=hub_env(hub, HF_HOME=str(parent / "hf")), user="nobody")
        assert result.returncode == 1, result.stderr
        assert f"permission denied writing to model root {root}" in result.stderr
        assert list(root.iterdir()) == []
    finally:
        shutil.rmtree(parent)


def test_interrupted_download_resumes_without_refetching_finished_files(hub, tmp_path):
    # Files finished in the staging dir are kept; the file in flight continues from the bytes kept
    # (huggingface_hub writes in 10 MiB chunks, so the file is big enough to keep some).
    size = 24_000_000
    hub.repos["org/slow-model"] = HubRepo(files={"model.safetensors": os.urandom(size), "config.json": b"{}"}, commit="c" * 40)
    hub.throttle_bytes_per_s = 8_000_000
    root = tmp_path / "models"
    argv = [sys.executable, "-m", "node_runtime.modelstore.cli", "download", "--repo-id", "org/slow-model", "--model-root", str(root)]
    process = subprocess.Popen(argv, env=hub_env(hub), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finished = root / ".staging" / "slow-model" / "config.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not finished.exists():
        time.sleep(0.05)
    partial = root / ".staging" / "slow-model" / ".partial" / "model.safetensors.part"
    while time.monotonic() < deadline and not (partial.is_file() and partial.stat().st_size > 0):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    assert finished.exists()
    held = partial.stat().st_size
    assert 0 < held < size
    assert not (root / "slow-model").exists(), "an interrupted download must not appear as a model"
    listing = json.loads(run_cli("list", "--model-root", str(root), "--json").stdout)
    assert [(r["name"], r["complete"]) for r in listing] == [("slow-model", False)]

    hub.throttle_bytes_per_s = None
    first_run = len(hub.requests)
    result = run_cli("download", "--repo-id", "org/slow-model", "--model-root", str(root), env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    fetched = [r["path"].rsplit("/", 1)[-1] for r in hub.requests[first_run:] if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert fetched == ["model.safetensors"]
    assert [r["range"] for r in hub.requests[first_run:] if r["method"] == "GET" and "/resolve/" in r["path"]] == [f"bytes={held}-"]
    assert hub.sent_bytes(first_run) == size - held
    assert verify_manifest(root / "slow-model", "full").ok
    assert not (root / "slow-model" / ".partial").exists()


def test_a_broken_connection_resumes_within_the_run(hub, tmp_path):
    # huggingface_hub writes what it received 10 MiB at a time and asks for the rest from there.
    size, written = 24_000_000, 10 << 20
    hub.repos["org/big-model"] = HubRepo(files={"model.safetensors": os.urandom(size)}, commit="b" * 40)
    hub.cut_after_bytes = 15_000_000
    root = tmp_path / "models"
    result = run_cli("download", "--repo-id", "org/big-model", "--model-root", str(root), env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    gets = [r for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert [(r["range"], r["sent"]) for r in gets] == [(None, 15_000_000), (f"bytes={written}-", size - written)]
    assert verify_manifest(root / "big-model", "full").ok


def test_a_staging_dir_of_another_revision_is_never_mixed_in(hub, tmp_path):
    root = tmp_path / "models"
    stale = root / ".staging" / "tiny-model"
    stale.mkdir(parents=True)
    (stale / "config.json").write_bytes(b'{"stale": true}')  # same name, other content, no origin record
    result = run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root), env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    assert "starting over" in result.stderr
    assert (root / "tiny-model" / "config.json").read_bytes() == make_repo_files()["config.json"]


def test_the_endpoint_option_wins_over_hf_endpoint(hub, tmp_path):
    root = tmp_path / "models"
    result = run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root), "--hf-endpoint", hub.url,
                     env=hub_env(hub, HF_ENDPOINT="http://127.0.0.1:9"))
    assert result.returncode == 0, result.stderr
    bad = run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root), "--hf-endpoint", "hf-mirror.com")
    assert bad.returncode == 2 and "--hf-endpoint" in bad.stderr


def test_hf_endpoint_set_after_huggingface_hub_was_imported_is_honoured(hub, tmp_path, monkeypatch):
    # huggingface_hub reads HF_ENDPOINT once, at import; a caller setting it later must still reach the mirror.
    code = (
        "import os, sys, huggingface_hub\n"
        "from pathlib import Path\n"
        "from node_runtime.modelstore.download import DownloadRequest, download\n"
        "os.environ['HF_ENDPOINT'] = sys.argv[1]\n"
        "print(download(DownloadRequest(source='huggingface', repo_id='org/tiny-model', model_root=Path(sys.argv[2]))).revision)\n"
    )
    env = {k: v for k, v in hub_env(hub).items() if k != "HF_ENDPOINT"}
    result = subprocess.run([sys.executable, "-c", code, hub.url, str(tmp_path / "models")], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == COMMIT
    assert any("/resolve/" in r["path"] for r in hub.requests)


def test_verify_reports_missing_and_corrupt_files_by_name(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for name, data in make_repo_files(weights_bytes=6_000_000).items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data)
    assert run_cli("download", "--source", "local", "--repo-id", "org/m", "--local-dir", str(model), "--model-root", str(model.parent)).returncode == 0
    assert run_cli("verify", str(model), "--hash", "full").returncode == 0

    (model / "tokenizer.json").unlink()
    with (model / "model-00001-of-00002.safetensors").open("r+b") as f:
        f.seek(1_300_000)  # between the sampled chunks: only a full hash sees it
        f.write(b"\xff")
    with (model / "model-00002-of-00002.safetensors").open("r+b") as f:
        f.write(b"\0" * 16)
    sampled = run_cli("verify", str(model), "--hash", "sample")
    assert sampled.returncode == 1
    assert sampled.stdout.splitlines() == ["corrupt: model-00002-of-00002.safetensors (sampled content hash differs)", "missing: tokenizer.json"]
    full = run_cli("verify", str(model), "--hash", "full")
    assert full.stdout.splitlines() == [
        "corrupt: model-00001-of-00002.safetensors (content hash differs)",
        "corrupt: model-00002-of-00002.safetensors (content hash differs)",
        "missing: tokenizer.json",
    ]
    assert "failed verification" in full.stderr


def test_list_and_remove(hub, tmp_path):
    root = tmp_path / "models"
    assert run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root), env=hub_env(hub)).returncode == 0
    (root / "half-copied").mkdir()
    (root / "half-copied" / "model.safetensors").write_bytes(b"x" * 10)
    rows = {r["name"]: r for r in json.loads(run_cli("list", "--model-root", str(root), "--json").stdout)}
    assert rows["tiny-model"]["complete"] and rows["tiny-model"]["revision"] == COMMIT and rows["tiny-model"]["source"] == "huggingface"
    assert rows["tiny-model"]["size"] == sum(map(len, make_repo_files().values()))
    assert not rows["half-copied"]["complete"]
    assert "tiny-model" in run_cli("list", "--model-root", str(root)).stdout

    no_yes = run_cli("remove", str(root / "tiny-model"))
    assert no_yes.returncode == 2 and "--yes" in no_yes.stderr and (root / "tiny-model").exists()
    not_model = run_cli("remove", str(root / "half-copied"), "--yes")
    assert not_model.returncode == 1 and "not a model directory" in not_model.stderr and (root / "half-copied").exists()
    assert run_cli("remove", str(root / "tiny-model"), "--yes").returncode == 0
    assert not (root / "tiny-model").exists()


def test_existing_other_model_is_never_overwritten(hub, tmp_path):
    root = tmp_path / "models"
    (root / "tiny-model").mkdir(parents=True)
    (root / "tiny-model" / "weights.bin").write_bytes(b"user data")
    result = run_cli("download", "--repo-id", "org/tiny-model", "--model-root", str(root), env=hub_env(hub))
    assert result.returncode == 1 and "not a complete model" in result.stderr
    assert (root / "tiny-model" / "weights.bin").read_bytes() == b"user data"
