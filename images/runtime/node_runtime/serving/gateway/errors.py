"""Every error the gateway returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

All handlers are installed here, in one place; a client never sees a traceback.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("node_runtime.gateway")

ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   error_type: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"message": message, "type": error_type or ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def unexpected_error_response(method: str, path: str) -> JSONResponse:
    """A 500 without the traceback; the traceback goes to the gateway's log. Call from an except block."""
    log.exception("unexpected error on %s %s", method, path)
    return error_response(500, "internal gateway error; the gateway's log has the details", error_type="api_error")


def _field_path(loc: tuple) -> str:
    path = ""
    for part in map(str, loc):
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


def validation_message(errors) -> tuple[str, str | None]:
    """Pydantic's errors as ('<field>: <problem>; ...', first field): the fields named the way the client wrote them."""
    problems, first_field = [], None
    for error in errors:
        if error["type"] == "json_invalid":
            return f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
        field = _field_path(tuple(error["loc"])) or "body"
        first_field = first_field or field
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{field}: {message}")
    return "; ".join(problems), first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request.method, request.url.path)
