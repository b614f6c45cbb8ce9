"""The image relay (node_runtime.imagerelay) with Docker's own client: `docker push` sends only the
layers it lacks, `docker pull` by digest on another engine fetches only the layers that engine lacks,
and both engines hold the same image ID; the protocol's refusals in the registry's error shape.

Needs root (Docker engines); the engines run in this namespace and reach the relay on loopback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.node_image import local_registry
from tests.support.docker_hosts import engine

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    root, port = tmp_path_factory.mktemp("relay"), _free_port()
    process = subprocess.Popen([sys.executable, "-m", "node_runtime.imagerelay", "serve", "--port", str(port), "--root", str(root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            httpx.get(f"{url}/v2/", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the relay did not listen within 30 s"
            time.sleep(0.2)
    yield f"127.0.0.1:{port}", root
    process.terminate()
    process.wait(timeout=20)


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _build(docker, context: Path, tag: str, top: bytes) -> None:
    (context / "top").write_bytes(top)
    docker.docker("build", "-t", tag, str(context), env={**os.environ, "DOCKER_BUILDKIT": "0"})


def _relay_reference(docker, tag: str, address: str) -> str:
    digests = docker.docker("image", "inspect", "--format", "{{range .RepoDigests}}{{println .}}{{end}}", tag).stdout
    return next(d for d in digests.split() if d.startswith(address))


def _image_id(docker, reference: str) -> str:
    return docker.docker("image", "inspect", "--format", "{{.Id}}", reference).stdout.strip()


def _relayed(head, worker, image: str, address: str, tag: str) -> tuple[str, str]:
    """Push `image` from `head` to the relay, pull it by digest on `worker`: both outputs; the same image ID."""
    head.docker("tag", image, f"{address}/node:{tag}")
    pushed = head.docker("push", f"{address}/node:{tag}").stdout
    reference = _relay_reference(head, image, address)
    pulled = worker.docker("pull", reference).stdout
    assert _image_id(worker, reference) == _image_id(head, image)
    return pushed, pulled


def test_push_and_pull_move_only_the_layers_missing(relay, tmp_path):
    address, _ = relay
    base_layer = os.urandom(3_000_000)
    with engine("air-relay-head", state_dir=tmp_path / "head") as head, \
            engine("air-relay-worker", state_dir=tmp_path / "worker") as worker:
        head.docker("import", "-", "vendor/base:1", input=_tar({"opt/vendor/lib.so": base_layer}), text=False)
        context = tmp_path / "context"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM vendor/base:1\nCOPY top /opt/runtime/top\n")
        _build(head, context, "node:1", os.urandom(400_000))
        pushed, pulled = _relayed(head, worker, "node:1", address, "one")
        assert pushed.count("Pushed") == 2 and pulled.count("Pull complete") == 2, (pushed, pulled)

        # Our layer changes, the base does not: one layer up, one layer down.
        _build(head, context, "node:2", os.urandom(400_000))
        pushed, pulled = _relayed(head, worker, "node:2", address, "two")
        assert pushed.count("Pushed") == 1 and pushed.count("Layer already exists") == 1, pushed
        assert pulled.count("Already exists") == 1 and pulled.count("Pull complete") == 1, pulled


def _upload(url: str, data: bytes, digest: str) -> httpx.Response:
    started = httpx.post(f"{url}/v2/node/blobs/uploads/")
    assert started.status_code == 202 and started.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    location = started.headers["Location"]
    patched = httpx.patch(f"{url}{location}", content=data)
    assert patched.status_code == 202 and patched.headers["Range"] == f"0-{len(data) - 1}"
    return httpx.put(f"{url}{location}", params={"digest": digest})


def test_a_blob_whose_content_is_not_its_digest_is_refused(relay):
    address, root = relay
    url = f"http://{address}"
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    refused = _upload(url, b"payload", wrong)
    assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert not (root / "blobs" / "sha256" / wrong.removeprefix("sha256:")).exists()
    right = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    assert _upload(url, b"payload", right).status_code == 201
    fetched = httpx.get(f"{url}/v2/node/blobs/{right}", headers={"Range": "bytes=3-"})
    assert fetched.status_code == 206 and fetched.content == b"load"


def test_a_manifest_naming_a_blob_never_pushed_is_refused(relay):
    address, _ = relay
    missing = "sha256:" + "ab" * 32
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"digest": missing, "size": 2}, "layers": []}
    refused = httpx.put(f"http://{address}/v2/node/manifests/broken", json=manifest,
                        headers={"Content-Type": manifest["mediaType"]})
    assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    unknown = httpx.get(f"http://{address}/v2/node/manifests/broken")
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_with_nodes_pulling_the_base_only_our_layer_comes_from_the_relay(relay, tmp_path):
    """nodesPullBase: the base comes from its registry (here Debian's distribution registry, standing
    for the vendor's) to every node; the relay claims its layers, so the worker fetches our layer alone."""
    address, root = relay
    with local_registry(tmp_path / "vendor") as vendor, \
            engine("air-relay-vendor", state_dir=tmp_path / "vendor-engine") as publisher, \
            engine("air-relay-head", state_dir=tmp_path / "head") as head, \
            engine("air-relay-worker", state_dir=tmp_path / "worker") as worker:
        publisher.docker("import", "-", "base:1", input=_tar({"opt/vendor/lib.so": os.urandom(2_000_000)}), text=False)
        context = tmp_path / "vendor-context"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM base:1\nCOPY top /opt/vendor/top\n")
        _build(publisher, context, f"{vendor}/dcu/vllm:0.9.2", os.urandom(1_000_000))
        publisher.docker("push", f"{vendor}/dcu/vllm:0.9.2")
        base = _relay_reference(publisher, f"{vendor}/dcu/vllm:0.9.2", vendor)
        for node in (head, worker):
            node.docker("pull", base)

        ours = tmp_path / "ours"
        ours.mkdir()
        (ours / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY top /opt/node-runtime/top\n")
        (ours / "top").write_bytes(os.urandom(300_000))
        head.docker("build", "--build-arg", f"BASE_IMAGE={base}", "-t", "node:1", str(ours),
                    env={**os.environ, "DOCKER_BUILDKIT": "0"})
        inspected = head.docker("manifest", "inspect", "--verbose", "--insecure", base).stdout
        claimed = subprocess.run([sys.executable, "-m", "node_runtime.imagerelay", "claim-base", "--root", str(root)],
                                 input=inspected, capture_output=True, text=True, check=True)
        assert claimed.stdout.strip() == "2 base layers"

        pushed, pulled = _relayed(head, worker, "node:1", address, "based")
        assert pushed.count("Layer already exists") == 2 and pushed.count("Pushed") == 1, pushed
        assert pulled.count("Already exists") == 2 and pulled.count("Pull complete") == 1, pulled
        vendor_layers = json.loads(publisher.docker("manifest", "inspect", "--insecure", base).stdout)["layers"]
        for layer in vendor_layers:
            assert not (root / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")).exists()
            refused = httpx.get(f"http://{address}/v2/node/blobs/{layer['digest']}")
            assert refused.status_code == 404 and "nodesPullBase" in refused.json()["errors"][0]["message"]
