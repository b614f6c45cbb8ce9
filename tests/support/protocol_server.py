"""What the hub protocol servers of these tests share: a threaded HTTP server on a free port that
records every request, and file bodies served with Range requests, optionally throttled (so a
test can kill a download mid-file) or cut once mid-file (a broken connection within a run).

Each request is recorded as a dict: method, path, query, range, auth (a credential was sent),
and sent (body bytes written to the socket), so a test can count what crossed the network.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

STEP = 64 * 1024


@dataclass
class ProtocolServer:
    requests: list[dict] = field(default_factory=list)
    throttle_bytes_per_s: int | None = None
    # Cut the first GET of each file after this many body bytes (the client sees a short body).
    cut_after_bytes: int | None = None
    cut: set[str] = field(default_factory=set)

    def start(self, host: str = "127.0.0.1") -> str:
        """Serve on `host` (another address than loopback: for clients in simulated hosts' namespaces)."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.handle(self, server.record(self), head=True)

            def do_GET(self):
                server.handle(self, server.record(self), head=False)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler, record: dict, head: bool) -> None:
        raise NotImplementedError

    def record(self, h: BaseHTTPRequestHandler) -> dict:
        url = urlsplit(h.path)
        record = {"method": h.command, "path": url.path, "query": url.query, "range": h.headers.get("Range"),
                  "auth": h.headers.get("Authorization") is not None or "m_session_id=" in (h.headers.get("Cookie") or ""),
                  "sent": 0}
        self.requests.append(record)
        return record

    def sent_bytes(self, since: int = 0, path_contains: str = "") -> int:
        return sum(r["sent"] for r in self.requests[since:] if path_contains in r["path"] + "?" + r["query"])

    def send_file(self, h: BaseHTTPRequestHandler, record: dict, data: bytes, head: bool, headers: dict[str, str]) -> None:
        """`data`, or the part a `Range: bytes=N-[M]` asks for (206), with `headers` besides the length headers."""
        start, end, status = 0, len(data), 200
        if (rng := h.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start, end, status = int(m[1]), int(m[2]) + 1 if m[2] else len(data), 206
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        key = record["path"] + "?" + record["query"]
        stop = end
        if self.cut_after_bytes is not None and key not in self.cut and end - start > self.cut_after_bytes:
            self.cut.add(key)
            stop = start + self.cut_after_bytes
        view = memoryview(data)
        for offset in range(start, stop, STEP):
            chunk = view[offset:min(offset + STEP, stop)]
            try:
                h.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return
            record["sent"] += len(chunk)
            if self.throttle_bytes_per_s:
                time.sleep(len(chunk) / self.throttle_bytes_per_s)
        if stop < end:
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def json(h: BaseHTTPRequestHandler, body, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
