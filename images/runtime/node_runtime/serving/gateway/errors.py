"""Every error the gateway returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

All handlers are installed here, in one place; a client never sees a traceback.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from node_runtime.serving.gateway.scope import identified

log = logging.getLogger("node_runtime.gateway")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "api_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


LONE_SURROGATE = "contains a lone surrogate (half of a UTF-16 pair), which is not valid Unicode text"


class StreamCut(Exception):
    """A replica's stream broke after its status line: the client's connection must be dropped. Raised
    to the server (uvicorn), which drops it; the gateway has logged it in one line, see quiet_stream_cuts."""


class _NoStreamCutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


def quiet_stream_cuts() -> None:
    """uvicorn logs an exception that ends a response with its traceback at ERROR: not for a StreamCut,
    which the gateway has logged already (a dead replica would otherwise fill the log with tracebacks)."""
    logging.getLogger("uvicorn.error").addFilter(_NO_STREAM_CUT_TRACEBACK)


_NO_STREAM_CUT_TRACEBACK = _NoStreamCutTraceback()


class GatewayError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, error_type=self.error_type,
                              headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   error_type: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"message": message, "type": error_type or ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def unexpected_error_response(method: str, path: str) -> JSONResponse:
    """A 500 without the traceback; the traceback goes to the gateway's log. Call from an except block."""
    log.exception("unexpected error on %s %s", method, path)
    return error_response(500, "internal gateway error; the gateway's log has the details", error_type="api_error")


# pydantic's words where the client needs plainer ones.
PLAIN_WORDS = {
    "extra_forbidden": "unknown field",
    # JSON may carry half of a UTF-16 surrogate pair ("\ud800"), which is no text (vLLM's tokenizer fails on it).
    "string_unicode": LONE_SURROGATE,
}


def _field_path(loc: tuple) -> str:
    """`prompts[1]`, `stop[0]`: pydantic's location without the tags it adds for each type of a union
    (`stop.list[str].0`), which are no field of the client's."""
    path = ""
    for part in map(str, loc):
        if part.isdigit():
            path += f"[{part}]"
        elif part.isidentifier():
            path += f".{part}" if path else part
    return path


def validation_message(errors) -> tuple[str, str | None]:
    """Pydantic's errors as ('<field>: <problem>; ...', first field): the fields named the way the client wrote them."""
    problems, first_field = [], None
    for error in errors:
        if error["type"] == "json_invalid":
            return f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
        field = _field_path(tuple(error["loc"])) or "body"
        first_field = first_field or field
        message = PLAIN_WORDS.get(error["type"], error["msg"].removeprefix("Value error, "))
        if f"{field}: {message}" not in problems:
            problems.append(f"{field}: {message}")
    return "; ".join(problems), first_field


def install_error_handlers(app: FastAPI) -> None:
    """Every error of a FastAPI route in our shape, with the request's X-Request-Id."""
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return identified(exc.response(), request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return identified(error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)),
                          request.scope)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return identified(unexpected_error_response(request.method, request.url.path), request.scope)
