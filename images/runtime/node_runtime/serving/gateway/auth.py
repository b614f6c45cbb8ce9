"""Bearer API key for the generation endpoints (the key itself only ever comes from env)."""

import secrets

from fastapi import Request

from node_runtime.serving.gateway.errors import GatewayError


async def require_api_key(request: Request) -> None:
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise GatewayError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )
