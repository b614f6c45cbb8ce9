"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol, refusing a request head (the
request line and the headers) larger than the config's max_header_bytes with 431, as soon as that
many bytes of it are in (httptools itself takes heads of any size).

The limit travels in uvicorn's own config as h11_max_incomplete_event_size (h11's bound on an
incomplete request head, the same thing), which uvicorn hands to every worker's protocols.
The refused request never reaches the app, so it is not in /metrics' gateway_requests.

Every request's bytes pass here, so the usual case costs one comparison: only data that could take a
head past the limit is looked at (where the head ends in it), and a head still incomplete after a
read adds that read to its count.
"""

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from node_runtime.serving.gateway.errors import error_response

HEAD_END = b"\r\n\r\n"


class HeadLimitedProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_head = self.config.h11_max_incomplete_event_size
        self.head_bytes = 0  # of a head still incomplete after the reads so far

    def data_received(self, data: bytes) -> None:
        if self.head_bytes + len(data) > self.max_head and self._head_may_start():
            end = data.find(HEAD_END)
            if end < 0 or self.head_bytes + end + len(HEAD_END) > self.max_head:
                self._refuse()
                return
        super().data_received(data)
        scope = self.scope
        # uvicorn starts a new scope at a request's first byte and sets its method once the head is in.
        self.head_bytes = self.head_bytes + len(data) if scope is not None and "method" not in scope else 0

    def _head_may_start(self) -> bool:
        """Whether `data` begins in a head: one under way, or the next request's (not the rest of a body)."""
        scope, cycle = self.scope, self.cycle
        return scope is None or "method" not in scope or cycle is None or not cycle.more_body

    def _refuse(self) -> None:
        body = error_response(431, f"the request head (request line and headers) is larger than the gateway's "
                                   f"limit of {self.max_head} bytes", code="header_too_large").body
        self.transport.write(b"".join([
            STATUS_LINE[431], b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n", body]))
        self.transport.close()
