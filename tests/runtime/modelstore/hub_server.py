"""A local server speaking the part of the Hugging Face Hub protocol that huggingface_hub's
`snapshot_download` uses, so the real client runs against it through HF_ENDPOINT:

- GET  /api/models/{repo}/revision/{rev}          repo info (`sha`, `siblings`)
- GET  /api/models/{repo}/tree/{rev}?recursive=1  file listing (`oid`, `size`, `lfs`)
- HEAD/GET /{repo}/resolve/{rev}/{path}           file metadata headers (X-Repo-Commit, ETag,
  X-Linked-Etag, X-Linked-Size for LFS files) and content, with Range requests for resuming

Errors use the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound),
which is how the client picks its exception. Private repos need `Authorization: Bearer TOKEN`.
Every request is recorded (method, path, Range, Authorization present) for assertions;
`throttle_bytes_per_s` slows file bodies so a test can interrupt a download.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 10_000


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str
    branches: tuple[str, ...] = ("main",)
    token: str | None = None

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches or revision == self.commit:
            return self.commit
        return None


@dataclass
class HubServer:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    throttle_bytes_per_s: int | None = None

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.handle(self, head=True)

            def do_GET(self):
                server.handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -------------------------------------------------------------- protocol

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = url.path
        self.requests.append({"method": h.command, "path": path, "range": h.headers.get("Range"),
                              "auth": h.headers.get("Authorization") is not None})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            return self.repo_info(h, unquote(m[1]), unquote(m[2]))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self.tree(h, unquote(m[1]), unquote(m[2]))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self.resolve_file(h, unquote(m[1]), unquote(m[2]), unquote(m[3]), head)
        self.error(h, 404, None, "Not Found")

    def lookup(self, h, repo_id: str, revision: str) -> tuple[HubRepo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}"):
            self.error(h, 401, "RepoNotFound", "Repository not found")
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def repo_info(self, h, repo_id: str, revision: str) -> None:
        if found := self.lookup(h, repo_id, revision):
            repo, commit = found
            self.json(h, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": bool(repo.token),
                          "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    def tree(self, h, repo_id: str, revision: str) -> None:
        if found := self.lookup(h, repo_id, revision):
            repo, _ = found
            entries = []
            for p, data in sorted(repo.files.items()):
                entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": p}
                if len(data) >= LFS_THRESHOLD:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self.json(h, entries)

    def resolve_file(self, h, repo_id: str, revision: str, file_path: str, head: bool) -> None:
        found = self.lookup(h, repo_id, revision)
        if not found:
            return
        repo, commit = found
        data = repo.files.get(file_path)
        if data is None:
            return self.error(h, 404, "EntryNotFound", f"{file_path} does not exist on {revision}")
        etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_THRESHOLD else git_blob_id(data)
        start, end = 0, len(data)
        status = 200
        if (rng := h.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start, end = int(m[1]), int(m[2]) + 1 if m[2] else len(data)
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag}"')
        if len(data) >= LFS_THRESHOLD:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        view = memoryview(data)[start:end]
        step = 64 * 1024
        for offset in range(0, len(view), step):
            try:
                h.wfile.write(view[offset:offset + step])
            except (BrokenPipeError, ConnectionResetError):
                return
            if self.throttle_bytes_per_s:
                time.sleep(step / self.throttle_bytes_per_s)

    @staticmethod
    def json(h, body) -> None:
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def error(h, status: int, code: str | None, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
