"""The image relay: the part of the registry protocol (Docker Registry HTTP API V2) that `docker push`
and `docker pull` use, serving one directory, for the head's loopback.

    python3 -m node_runtime.imagerelay serve --port 5550 --root /data/vllm-dcu/image-relay
    docker manifest inspect --verbose BASE | python3 -m node_runtime.imagerelay claim-base --root DIR

The head pushes the node image to it; each worker pulls by digest through an ssh tunnel to its own
127.0.0.1 (Docker trusts a loopback registry without TLS), so only the layers a worker lacks cross
the network. It listens on loopback only and has no authentication of its own: the ssh tunnel,
made with the head's relay key, is what admits a worker.

Why a relay of our own and not the distribution registry: it ships inside the node image, so an
air-gapped DCU site needs no further binary or image, and the node image cannot be built with a
package manager there. It keeps what Docker's client needs: blobs by digest (HEAD, GET with
Range), uploads (POST, PATCH, PUT with the digest checked, cross-repository mounts), manifests by
tag or digest (the blobs they name must be present), errors in the registry's JSON shape.

Storage: `blobs/sha256/<hex>` (manifests too, their media type beside in `<hex>.type`),
`tags/<repository>/<tag>` holding a manifest digest, `uploads/<uuid>` while a blob arrives.
Blobs are shared by every repository.

Where every node pulls the vendor base from its registry itself (`nodesPullBase`), `claim-base`
records the base's layer blobs as the vendor's registry has them (`base/sha256/<hex>` holding the
size): the relay answers a HEAD for them without holding them, so Docker's push names the vendor's
own blobs in the node image's manifest, and a worker that pulled the base already has every one of
them: only our layer comes from the head. A GET of such a blob is refused, naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import typer
from aiohttp import web

API_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_NAME = r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
_ROUTES = [
    ("blob", re.compile(rf"^/v2/(?P<name>{_NAME})/blobs/(?P<digest>[^/]+)$")),
    ("uploads", re.compile(rf"^/v2/(?P<name>{_NAME})/blobs/uploads/?$")),
    ("upload", re.compile(rf"^/v2/(?P<name>{_NAME})/blobs/uploads/(?P<upload_id>[0-9a-f-]{{36}})$")),
    ("manifest", re.compile(rf"^/v2/(?P<name>{_NAME})/manifests/(?P<reference>[^/]+)$")),
]
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
CHUNK = 1 << 20


class RegistryError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Store:
    def __init__(self, root: Path):
        self.root = root
        for part in ("blobs/sha256", "tags", "uploads", "base/sha256"):
            (root / part).mkdir(parents=True, exist_ok=True)
        # Uploads in progress: their running hash (an upload outlives no restart; Docker retries it).
        self.hashes: dict[str, Any] = {}

    def blob(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise RegistryError(400, "DIGEST_INVALID", f"{digest!r} is not a sha256 digest")
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def existing_blob(self, digest: str) -> Path:
        path = self.blob(digest)
        if not path.is_file():
            if self.base_size(digest) is not None:
                raise RegistryError(404, "BLOB_UNKNOWN", f"blob {digest} is a layer of the base image, which each "
                                    "node pulls from its registry itself (nodesPullBase): pull baseImage on this node")
            raise RegistryError(404, "BLOB_UNKNOWN", f"blob {digest} is not here")
        return path

    def base_size(self, digest: str) -> int | None:
        """The size of a base image layer that the nodes hold (claim-base), or None."""
        claimed = self.root / "base" / "sha256" / self.blob(digest).name
        return int(claimed.read_text()) if claimed.is_file() else None

    def claim_base(self, layers: dict[str, int]) -> None:
        for digest, size in layers.items():
            self.blob(digest)  # checks the digest's form
            (self.root / "base" / "sha256" / digest.removeprefix("sha256:")).write_text(str(size))

    def upload(self, upload_id: str) -> Path:
        path = self.root / "uploads" / upload_id
        if upload_id not in self.hashes or not path.is_file():
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload_id} is not in progress")
        return path

    def start_upload(self) -> str:
        upload_id = str(uuid.uuid4())
        (self.root / "uploads" / upload_id).touch()
        self.hashes[upload_id] = hashlib.sha256()
        return upload_id

    def finish_upload(self, upload_id: str, digest: str) -> None:
        path, actual = self.upload(upload_id), "sha256:" + self.hashes[upload_id].hexdigest()
        del self.hashes[upload_id]
        if actual != digest:
            path.unlink()
            raise RegistryError(400, "DIGEST_INVALID", f"the upload's content is {actual}, not {digest}")
        os.replace(path, self.blob(digest))

    def tag_file(self, name: str, tag: str) -> Path:
        return self.root / "tags" / name / tag

    def manifest(self, name: str, reference: str) -> tuple[str, bytes, str]:
        """(digest, content, media type) of `name`'s manifest by tag or digest."""
        if _DIGEST.match(reference):
            digest = reference
        else:
            tag = self.tag_file(name, reference)
            if not _TAG.match(reference) or not tag.is_file():
                raise RegistryError(404, "MANIFEST_UNKNOWN", f"{name}:{reference} is not here")
            digest = tag.read_text().strip()
        path = self.blob(digest)
        media_type = path.with_name(path.name + ".type")
        if not path.is_file() or not media_type.is_file():
            raise RegistryError(404, "MANIFEST_UNKNOWN", f"{name}@{digest} is not here")
        return digest, path.read_bytes(), media_type.read_text()

    def put_manifest(self, name: str, reference: str, content: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        if _DIGEST.match(reference) and reference != digest:
            raise RegistryError(400, "DIGEST_INVALID", f"the manifest's content is {digest}, not {reference}")
        if not _DIGEST.match(reference) and not _TAG.match(reference):
            raise RegistryError(400, "TAG_INVALID", f"{reference!r} is not a tag")
        try:
            parsed = json.loads(content)
        except ValueError:
            raise RegistryError(400, "MANIFEST_INVALID", "the manifest is not JSON") from None
        for descriptor in [parsed.get("config") or {}, *(parsed.get("layers") or []), *(parsed.get("manifests") or [])]:
            named = descriptor.get("digest")
            if named and not self.blob(named).is_file() and self.base_size(named) is None:
                raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN", f"the manifest names {named}, which was not pushed")
        path = self.blob(digest)
        path.with_name(path.name + ".type").write_text(media_type)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(content)
        os.replace(partial, path)
        if not _DIGEST.match(reference):
            tag = self.tag_file(name, reference)
            tag.parent.mkdir(parents=True, exist_ok=True)
            tag.with_name(tag.name + ".partial").write_text(digest)
            os.replace(tag.with_name(tag.name + ".partial"), tag)
        return digest


def _error(error: RegistryError) -> web.Response:
    body = {"errors": [{"code": error.code, "message": error.message, "detail": None}]}
    return web.json_response(body, status=error.status, headers=API_HEADER)


def _upload_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {**API_HEADER, "Location": f"/v2/{name}/blobs/uploads/{upload_id}", "Docker-Upload-UUID": upload_id,
            "Range": f"0-{max(size - 1, 0)}"}


def _created(name: str, digest: str) -> web.Response:
    return web.Response(status=201, headers={**API_HEADER, "Location": f"/v2/{name}/blobs/{digest}",
                                             "Docker-Content-Digest": digest, "Content-Length": "0"})


async def _append(store: Store, upload_id: str, request: web.Request) -> int:
    path, running = store.upload(upload_id), store.hashes[upload_id]
    with path.open("ab") as out:
        async for chunk in request.content.iter_chunked(CHUNK):
            running.update(chunk)
            out.write(chunk)
        return out.tell()


async def _blob(store: Store, request: web.Request, name: str, digest: str) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise RegistryError(405, "UNSUPPORTED", f"{request.method} on a blob")
    headers = {**API_HEADER, "Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
    if request.method == "HEAD" and not store.blob(digest).is_file() and (size := store.base_size(digest)) is not None:
        return web.Response(headers={**headers, "Content-Length": str(size)})
    path = store.existing_blob(digest)
    if request.method == "HEAD":
        return web.Response(headers={**headers, "Content-Length": str(path.stat().st_size)})
    return web.FileResponse(path, headers=headers)


async def _uploads(store: Store, request: web.Request, name: str) -> web.StreamResponse:
    if request.method != "POST":
        raise RegistryError(405, "UNSUPPORTED", f"{request.method} on uploads")
    mount = request.query.get("mount")
    if mount and store.blob(mount).is_file():
        return _created(name, mount)
    upload_id = store.start_upload()
    if "digest" in request.query:  # a monolithic upload: the whole blob in this request
        await _append(store, upload_id, request)
        store.finish_upload(upload_id, request.query["digest"])
        return _created(name, request.query["digest"])
    return web.Response(status=202, headers={**_upload_headers(name, upload_id, 0), "Content-Length": "0"})


async def _upload(store: Store, request: web.Request, name: str, upload_id: str) -> web.StreamResponse:
    if request.method == "PATCH":
        size = await _append(store, upload_id, request)
        return web.Response(status=202, headers={**_upload_headers(name, upload_id, size), "Content-Length": "0"})
    if request.method == "PUT":
        await _append(store, upload_id, request)
        digest = request.query.get("digest", "")
        store.finish_upload(upload_id, digest)
        return _created(name, digest)
    if request.method == "GET":
        size = store.upload(upload_id).stat().st_size
        return web.Response(status=204, headers=_upload_headers(name, upload_id, size))
    if request.method == "DELETE":
        store.upload(upload_id).unlink()
        store.hashes.pop(upload_id, None)
        return web.Response(status=204, headers=API_HEADER)
    raise RegistryError(405, "UNSUPPORTED", f"{request.method} on an upload")


async def _manifest(store: Store, request: web.Request, name: str, reference: str) -> web.StreamResponse:
    if request.method == "PUT":
        media_type = request.headers.get("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")
        digest = store.put_manifest(name, reference, await request.read(), media_type)
        return web.Response(status=201, headers={**API_HEADER, "Location": f"/v2/{name}/manifests/{digest}",
                                                 "Docker-Content-Digest": digest, "Content-Length": "0"})
    if request.method not in ("GET", "HEAD"):
        raise RegistryError(405, "UNSUPPORTED", f"{request.method} on a manifest")
    digest, content, media_type = store.manifest(name, reference)
    headers = {**API_HEADER, "Docker-Content-Digest": digest, "Content-Type": media_type,
               "Content-Length": str(len(content))}
    return web.Response(body=None if request.method == "HEAD" else content, headers=headers)


def make_app(root: Path) -> web.Application:
    store = Store(root)
    handlers = {"blob": _blob, "uploads": _uploads, "upload": _upload, "manifest": _manifest}

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            if path in ("/v2", "/v2/"):
                return web.json_response({}, headers=API_HEADER)
            for kind, pattern in _ROUTES:
                if match := pattern.match(path):
                    return await handlers[kind](store, request, **match.groupdict())
            raise RegistryError(404, "NAME_UNKNOWN", f"nothing at {path}")
        except RegistryError as error:
            return _error(error)

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{path:.*}", dispatch)
    return app


def base_layers(inspected: object, architecture: str = "amd64") -> dict[str, int]:
    """{digest: size} of the layers in `docker manifest inspect --verbose` output: one image, or a
    list of them by platform (the linux/`architecture` one)."""
    entries = inspected if isinstance(inspected, list) else [inspected]
    for entry in entries:
        platform = (entry.get("Descriptor") or {}).get("platform") or {}
        if len(entries) == 1 or (platform.get("os"), platform.get("architecture")) == ("linux", architecture):
            manifest = entry.get("SchemaV2Manifest") or entry.get("OCIManifest") or {}
            layers = {layer["digest"]: int(layer["size"]) for layer in manifest.get("layers") or []}
            if layers:
                return layers
    raise ValueError(f"no linux/{architecture} image with layers in the inspected manifest")


app = typer.Typer(no_args_is_help=True, help=__doc__.split("\n\n")[0])
ROOT = typer.Option(..., help="Directory holding the blobs, manifests and tags.")


@app.command()
def serve(
    port: int = typer.Option(..., help="Port on the address below."),
    root: Path = ROOT,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback: workers come through ssh tunnels)."),
) -> None:
    """Serve the relay."""
    web.run_app(make_app(root), host=host, port=port, access_log=None, print=None)


@app.command("claim-base")
def claim_base(root: Path = ROOT) -> None:
    """Record the base image's layers (`docker manifest inspect --verbose BASE` on stdin) as held by every node."""
    try:
        layers = base_layers(json.load(sys.stdin))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise typer.BadParameter(f"stdin is not `docker manifest inspect --verbose` output: {error}") from None
    Store(root).claim_base(layers)
    typer.echo(f"{len(layers)} base layers")


if __name__ == "__main__":
    app()
