"""The kdgate error hierarchy: every error a client can cause, with its HTTP status.

    KdgateError (500)            something on our side went wrong
    ├── InvalidInput (400)       the request is malformed or does not fit the model signature
    ├── Unauthorized (401)       no or wrong bearer token
    ├── Forbidden (403)          the token is valid but may not do this
    ├── ModelNotFound (404)      unknown model or version
    ├── RequestTimeout (408)     the body did not arrive within server.body_timeout_seconds
    ├── Conflict (409)           the change must be made elsewhere (a read-only traffic file)
    ├── PayloadTooLarge (413)    the body is over server.max_body_bytes
    ├── NotReady (503)           the model is still loading or warming up
    └── DeadlineExceeded (504)   a wait inside the server (a file read, a lock) ran out of time

Each response body is `{"error": "<what was wrong and what was expected>"}`, with the class's
`headers` added. One handler, registered on the base class, renders them all (Starlette resolves
handlers by MRO); the raw inference path renders them with `error_body` directly.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class KdgateError(Exception):
    """Base of every kdgate error; `status_code` is the HTTP status it maps to."""

    status_code: ClassVar[int] = 500
    # Raw (lower-case) response headers every response for this error carries.
    headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(KdgateError):
    """The request body or parameters are wrong (400); bad input never becomes a 500."""

    status_code = 400


class Unauthorized(KdgateError):
    """Missing or wrong credentials (401)."""

    status_code = 401


class Forbidden(KdgateError):
    """Authenticated but not allowed (403)."""

    status_code = 403


class ModelNotFound(KdgateError):
    """Unknown model name or version (404)."""

    status_code = 404


class Conflict(KdgateError):
    """The change cannot be made here (409): the message says where to make it."""

    status_code = 409


class RequestTimeout(KdgateError):
    """The client did not send its whole body in time (408); the connection is closed, since
    the rest of that body may still be on its way."""

    status_code = 408
    headers = ((b"connection", b"close"),)


class PayloadTooLarge(KdgateError):
    """Request body over the configured limit (413)."""

    status_code = 413


class NotReady(KdgateError):
    """The model cannot serve yet (503)."""

    status_code = 503


def error_body(message: str) -> bytes:
    """The JSON error body every kdgate error response carries."""
    return orjson.dumps({"error": message})


class DeadlineExceeded(KdgateError):
    """Something the request waited for inside the server took longer than its deadline (504)."""

    status_code = 504
