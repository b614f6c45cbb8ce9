"""A local server speaking the part of ModelScope's HTTP API (`/api/v1`) that the modelscope SDK's
`HubApi` and `snapshot_download` use, so the real client runs against it through its `endpoint`
(MODELSCOPE_ENDPOINT, or `node-runtime model download --modelscope-endpoint`):

- GET /api/v1/models/{repo}/revisions                       branches and tags (`RevisionMap`)
- GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=&Root=  file listing (`Path`, `Type`,
  `Size`, `Sha256`, `IsLFS`)
- GET /api/v1/models/{repo}/repo?Revision=&FilePath=        file content, with Range requests
- GET /api/v1/models/{repo}                                 model info

Every answer is the API's JSON envelope (`Code`, `Data`, `Message`, `RequestId`, `Success`); a
repository that does not exist, or is private and asked for without its token, is an HTTP 404
whose body carries the hub's own message, as ModelScope answers. The SDK authenticates with
`Authorization: Bearer TOKEN` and the `m_session_id` cookie; either is accepted. Everything
else (e.g. the SDK's probe for an Aliyun region) gets a 404. Requests are recorded, and file
bodies throttled or cut, as tests/support/protocol_server.py describes.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

from tests.support.protocol_server import ProtocolServer

LFS_THRESHOLD = 10_000
CREATED = int(time.time()) - 86_400


@dataclass
class ModelScopeRepo:
    """Files per revision: a branch or a tag, each with its own content."""

    revisions: dict[str, dict[str, bytes]]
    branches: tuple[str, ...] = ("master",)
    token: str | None = None

    @property
    def tags(self) -> list[str]:
        return [r for r in self.revisions if r not in self.branches]


@dataclass
class ModelScopeServer(ProtocolServer):
    repos: dict[str, ModelScopeRepo] = field(default_factory=dict)

    def handle(self, h, record: dict, head: bool) -> None:
        query = {k: v[0] for k, v in parse_qs(record["query"]).items()}
        if not (m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/revisions|/repo/files|/repo)?", record["path"])):
            return self.reply(h, 404, None, "Not Found")
        repo = self.repos.get(unquote(m[1]))
        if repo is None or (repo.token and not self.authorized(h, repo.token)):
            # ModelScope's answer for a model it will not show, seen from its real API.
            return self.reply(h, 404, None, "获取模型版本失败，信息：获取模失败", code=10010200001)
        if m[2] is None:
            return self.reply(h, 200, {"Name": m[1].split("/")[1], "Path": m[1].split("/")[0], "Private": bool(repo.token)})
        if m[2] == "/revisions":
            entry = lambda name: {"Revision": name, "CreatedAt": CREATED, "Description": ""}  # noqa: E731
            return self.reply(h, 200, {"RevisionMap": {"Branches": [entry(b) for b in repo.branches],
                                                        "Tags": [entry(t) for t in repo.tags]}})
        files = repo.revisions.get(query.get("Revision", "master"))
        if files is None:
            return self.reply(h, 404, None, f"revision {query.get('Revision')} does not exist")
        if m[2] == "/repo/files":
            return self.reply(h, 200, {"Files": self.listing(files, query)})
        data = files.get(query.get("FilePath", ""))
        if data is None:
            return self.reply(h, 404, None, "file does not exist")
        self.send_file(h, record, data, head, {"Content-Type": "application/octet-stream"})

    @staticmethod
    def authorized(h, token: str) -> bool:
        return h.headers.get("Authorization") == f"Bearer {token}" or f"m_session_id={token}" in (h.headers.get("Cookie") or "")

    @staticmethod
    def listing(files: dict[str, bytes], query: dict[str, str]) -> list[dict]:
        root = query.get("Root", "").strip("/")
        recursive = query.get("Recursive", "False").lower() == "true"
        dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
        entries = [{"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0} for d in sorted(dirs)]
        for path, data in sorted(files.items()):
            entries.append({"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob", "Size": len(data),
                            "Sha256": hashlib.sha256(data).hexdigest(), "IsLFS": len(data) >= LFS_THRESHOLD,
                            "CommittedDate": CREATED})
        inside = [e for e in entries if not root or e["Path"].startswith(root + "/")]
        depth = root.count("/") + 1 if root else 0
        return inside if recursive else [e for e in inside if e["Path"].count("/") == depth]

    def reply(self, h, status: int, data, message: str = "success", code: int | None = None) -> None:
        self.json(h, {"Code": code or status, "Data": data, "Message": message, "RequestId": str(uuid.uuid4()),
                      "Success": status == 200}, status)
