"""Bearer-token checks for the admin API and the Alertmanager hook (one token: `admin.token`)."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from kdgate.service.errors import Forbidden, Unauthorized


def check_bearer(authorization: str | None, token: SecretStr) -> None:
    """Raise 401 without a `Bearer <token>` header, 403 when the token is not `token`."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <admin.token>'")
    # Constant-time comparison: the time taken says nothing about how much of a guess matched.
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("the bearer token is not the configured admin.token")
