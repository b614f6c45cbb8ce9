"""A local server speaking the part of the Hugging Face Hub protocol that huggingface_hub's
`snapshot_download` uses, so the real client runs against it through HF_ENDPOINT:

- GET  /api/models/{repo}/revision/{rev}          repo info (`sha`, `siblings`)
- GET  /api/models/{repo}/tree/{rev}?recursive=1  file listing (`oid`, `size`, `lfs`)
- HEAD/GET /{repo}/resolve/{rev}/{path}           file metadata headers (X-Repo-Commit, ETag,
  X-Linked-Etag, X-Linked-Size for LFS files) and content, with Range requests for resuming

Errors use the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound),
which is how the client picks its exception. Private repos need `Authorization: Bearer TOKEN`.
Requests are recorded, and file bodies throttled or cut, as protocol_server.py describes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from tests.support.protocol_server import ProtocolServer

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
class HubServer(ProtocolServer):
    repos: dict[str, HubRepo] = field(default_factory=dict)

    def handle(self, h, record: dict, head: bool) -> None:
        path = record["path"]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            return self.repo_info(h, unquote(m[1]), unquote(m[2]))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self.tree(h, unquote(m[1]), unquote(m[2]))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self.resolve_file(h, record, unquote(m[1]), unquote(m[2]), unquote(m[3]), head)
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

    def resolve_file(self, h, record: dict, repo_id: str, revision: str, file_path: str, head: bool) -> None:
        found = self.lookup(h, repo_id, revision)
        if not found:
            return
        repo, commit = found
        data = repo.files.get(file_path)
        if data is None:
            return self.error(h, 404, "EntryNotFound", f"{file_path} does not exist on {revision}")
        etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_THRESHOLD else git_blob_id(data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
        if len(data) >= LFS_THRESHOLD:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        self.send_file(h, record, data, head, headers)

    def error(self, h, status: int, code: str | None, message: str) -> None:
        self.json(h, {"error": message}, status, {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {}))


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
