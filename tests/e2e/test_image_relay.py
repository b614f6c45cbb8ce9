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

from node_runtime import imagerelay
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


def _imported(head, image: str, root: Path, tag: str, **options) -> tuple[str, dict[str, tuple[int, int]]]:
    """`docker save image | import` into the relay's store (in this process, so the tests may shrink its
    limits): the manifest digest, and each blob's (inode, mtime) afterwards."""
    layers = head.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", image).stdout
    saved = subprocess.Popen(["docker", "-H", head.url, "save", image], stdout=subprocess.PIPE)
    try:
        digest = imagerelay.import_saved(imagerelay.Store(root), saved.stdout, "node", tag, json.loads(layers), **options)
    finally:
        saved.stdout.close()
        saved.wait(timeout=60)
    blobs = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / "blobs" / "sha256").iterdir()}
    return digest, blobs


def test_imported_layers_are_pulled_uncompressed_and_a_change_writes_only_the_new_layer(relay, tmp_path):
    """What the program does (push_script): `docker save | import`, no gzip; the worker's engine pulls the
    uncompressed layers by digest and holds the head's image ID; the next image writes only its new layer."""
    address, root = relay
    with engine("air-import-head", state_dir=tmp_path / "head") as head, \
            engine("air-import-worker", state_dir=tmp_path / "worker") as worker:
        base_layer = os.urandom(imagerelay.LARGE_LAYER + 1_000_000)  # large: the next import only hashes it
        head.docker("import", "-", "vendor/base:1", input=_tar({"opt/vendor/lib.so": base_layer}), text=False)
        context = tmp_path / "context"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM vendor/base:1\nCOPY top /opt/runtime/top\n")
        _build(head, context, "node:1", os.urandom(400_000))
        digest, before = _imported(head, "node:1", root, "imported-one")
        manifest = httpx.get(f"http://{address}/v2/node/manifests/imported-one",
                             headers={"Accept": imagerelay.MANIFEST_V2}).json()
        diff_ids = json.loads(head.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", "node:1").stdout)
        assert [layer["digest"] for layer in manifest["layers"]] == diff_ids
        assert {layer["mediaType"] for layer in manifest["layers"]} == {imagerelay.UNCOMPRESSED_LAYER}
        pulled = worker.docker("pull", f"{address}/node@{digest}").stdout
        assert pulled.count("Pull complete") == 2, pulled
        assert _image_id(worker, f"{address}/node@{digest}") == _image_id(head, "node:1")

        _build(head, context, "node:2", os.urandom(400_000))
        digest, after = _imported(head, "node:2", root, "imported-two")
        base = diff_ids[0].removeprefix("sha256:")
        assert after[base] == before[base], "the base layer was written again"
        top = json.loads(head.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", "node:2").stdout)[-1]
        new = {top, _image_id(head, "node:2"), digest}  # our new layer, the image config, the manifest
        assert set(after) - set(before) == {d.removeprefix("sha256:") for d in new} | {digest[7:] + ".type"}
        pulled = worker.docker("pull", f"{address}/node@{digest}").stdout
        assert pulled.count("Already exists") == 1 and pulled.count("Pull complete") == 1, pulled
        assert _image_id(worker, f"{address}/node@{digest}") == _image_id(head, "node:2")


def test_a_new_layer_of_a_stored_layers_size_is_imported_on_the_second_pass(relay, tmp_path, monkeypatch):
    """Docker's legacy `docker save` layout names a layer's digest only after all the layers: a large layer
    of the size of one already here is hashed without being written, and if it turns out new, the import
    says so (the CLI's exit status 75) and a second pass with write_all stores it."""
    _, root = relay
    monkeypatch.setattr(imagerelay, "IN_MEMORY", 16_384)
    monkeypatch.setattr(imagerelay, "LARGE_LAYER", 32_768)
    with engine("air-import-size", state_dir=tmp_path / "head") as head:
        head.docker("import", "-", "sized:1", input=_tar({"opt/data": os.urandom(100_000)}), text=False)
        head.docker("import", "-", "sized:2", input=_tar({"opt/data": os.urandom(100_000)}), text=False)
        _imported(head, "sized:1", root, "sized-one")
        # sized:2's only layer has sized:1's size; claim sized:1's diff ID as its own to make the size known.
        first = json.loads(head.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", "sized:1").stdout)
        second = json.loads(head.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", "sized:2").stdout)
        saved = head.docker("save", "sized:2", text=False).stdout
        with pytest.raises(imagerelay.SameSizeNewLayer):
            imagerelay.import_saved(imagerelay.Store(root), io.BytesIO(saved), "node", "sized-two", first + second)
        assert not (root / "blobs" / "sha256" / second[0].removeprefix("sha256:")).exists()
        digest = imagerelay.import_saved(imagerelay.Store(root), io.BytesIO(saved), "node", "sized-two", first + second,
                                         write_all=True)
        assert (root / "blobs" / "sha256" / second[0].removeprefix("sha256:")).is_file()
        assert imagerelay.Store(root).manifest("node", "sized-two")[0] == digest


def test_an_oci_layout_layer_already_stored_is_not_read_again(tmp_path, monkeypatch):
    """Docker 25 and later save in OCI's layout, where a layer's path is its digest."""
    monkeypatch.setattr(imagerelay, "IN_MEMORY", 1024)
    layer = _tar({"opt/data": os.urandom(50_000)})
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
    config_path = "blobs/sha256/" + hashlib.sha256(config).hexdigest()
    layer_path = "blobs/sha256/" + layer_digest[7:]
    saved = _tar({"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', layer_path: layer, config_path: config,
                  "manifest.json": json.dumps([{"Config": config_path, "Layers": [layer_path]}]).encode()})
    store = imagerelay.Store(tmp_path / "relay")
    first = imagerelay.import_saved(store, io.BytesIO(saved), "node", "oci", [layer_digest])
    stored = store.blob(layer_digest).stat()
    assert imagerelay.import_saved(store, io.BytesIO(saved), "node", "oci", [layer_digest]) == first
    assert (store.blob(layer_digest).stat().st_ino, store.blob(layer_digest).stat().st_mtime_ns) == \
        (stored.st_ino, stored.st_mtime_ns)
    manifest = json.loads(store.manifest("node", "oci")[1])
    assert manifest["layers"] == [{"mediaType": imagerelay.UNCOMPRESSED_LAYER, "size": len(layer), "digest": layer_digest}]


def test_import_refuses_what_is_not_one_images_docker_save_stream(relay):
    _, root = relay
    with pytest.raises(ValueError, match="not the `docker save` stream of one image"):
        imagerelay.import_saved(imagerelay.Store(root), io.BytesIO(_tar({"notes.txt": b"hello"})), "node", "x", [])


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
