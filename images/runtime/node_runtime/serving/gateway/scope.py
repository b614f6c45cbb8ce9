"""What a request's ASGI scope says: a header, the request's id."""

import random
import re


def header(scope: dict, name: bytes) -> str | None:
    """A request header straight from the ASGI scope (whose names arrive lower-cased)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


# A client's X-Request-Id is kept when it is 1-128 visible ASCII characters; otherwise a new one is made.
REQUEST_ID = re.compile(r"[!-~]{1,128}")


def request_id(scope: dict) -> str:
    """The client's X-Request-Id, else a new one: random enough to be unique, not a secret (no urandom call)."""
    rid = scope.get("request_id")
    if rid is None:
        sent = header(scope, b"x-request-id")
        rid = scope["request_id"] = sent if sent and REQUEST_ID.fullmatch(sent) else f"{random.getrandbits(128):032x}"
    return rid


def identified(response, scope: dict):
    """`response` with the request's X-Request-Id (its raw headers are built already: appended, not rebuilt)."""
    response.raw_headers.append((b"x-request-id", request_id(scope).encode()))
    return response

