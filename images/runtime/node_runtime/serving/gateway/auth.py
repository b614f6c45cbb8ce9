"""Bearer API key for the generation endpoints (the key itself only ever comes from env)."""

import secrets

from node_runtime.serving.gateway.errors import GatewayError


def check_api_key(authorization: str | None, expected: str | None) -> None:
    """Raise 401 unless `authorization` is 'Bearer <expected>' (or no key is configured)."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise GatewayError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )
