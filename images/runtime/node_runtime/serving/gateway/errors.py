"""Every error the gateway returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

All handlers are installed here, in one place; a client never sees a traceback.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("node_runtime.gateway")

ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
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


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   error_type: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"message": message, "type": error_type or ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field_path(loc: tuple) -> str:
    parts = [str(part) for part in loc[1:]] if loc and loc[0] in ("body", "query", "path") else [str(p) for p in loc]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """('<field>: <problem>; ...', first field) — the fields named the way the client wrote them."""
    problems, first_field = [], None
    for error in exc.errors():
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
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_message(exc)
        return error_response(422, message, param=field, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal gateway error; the gateway's log has the details", error_type="api_error")
