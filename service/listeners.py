"""An optional second port for the operator's routes: admin, metrics and hooks.

    server.admin_port: null    one port serves everything (the default)
    server.admin_port: 9000    /admin/*, /metrics, /v1/hooks/*  only on 9000
                               everything else (inference, health, /v1/*)  only on server.port

One process, one app, one uvicorn server listening on two sockets: the app tells the ports apart
by the local port of the connection (`scope["server"]`), so the models, metrics and background
tasks stay shared and graceful shutdown covers both listeners (with `server.workers` > 1, the
supervisor binds both and every worker serves both: service/workers.py). A route asked on the
wrong port answers 404, so a network policy or Service can expose inference alone.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import orjson
import uvicorn
from starlette.types import Scope, Send

log = logging.getLogger("uvicorn.error")

ADMIN_PREFIXES = ("/admin/", "/v1/hooks/")
ADMIN_PATHS = frozenset({"/admin", "/metrics"})


def is_admin_path(path: str) -> bool:
    """Whether `path` belongs on the admin port."""
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)


class PortSplit:
    """Which routes each port serves, once `server.admin_port` is set."""

    def __init__(self, admin_port: int) -> None:
        self.admin_port = admin_port

    def misplaced(self, scope: Scope) -> str | None:
        """Why this request is on the wrong port (the 404 message), or None when it is not."""
        server = scope.get("server")
        on_admin = server is not None and server[1] == self.admin_port
        if is_admin_path(scope["path"]) == on_admin:
            return None
        if on_admin:
            return f"{scope['path']} is not served on the admin port (server.admin_port)"
        return f"{scope['path']} is served on the admin port only (server.admin_port)"

    async def refuse(self, message: str, send: Send) -> None:
        """Answer 404 with a JSON error."""
        body = orjson.dumps({"error": message})
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class ListenError(Exception):
    """A port could not be bound (in use, not permitted)."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), as uvicorn binds its own (IPv6 when `host` has ':')."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _TwoPortServer(uvicorn.Server):
    """uvicorn on given sockets; says where it listens once it does (uvicorn does not then)."""

    def __init__(self, config: uvicorn.Config, main: socket.socket, admin: socket.socket) -> None:
        super().__init__(config)
        self.main = main
        self.admin = admin

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host = self.config.host
            # uvicorn's own wording for the main port: scripts and tests look for it.
            log.info("Uvicorn running on %s (Press CTRL+C to quit)", _url(host, self.main))
            log.info("admin, metrics and hooks on %s", _url(host, self.admin))


def serve_two_ports(config: uvicorn.Config, app: Any, admin_port: int) -> None:
    """Run `config` on its host/port plus `admin_port`, setting `app.ports` to split the routes
    (`app`: the KdgateApp inside `config.app`). Blocks until shutdown."""
    main = bind(config.host, config.port)
    try:
        admin = bind(config.host, admin_port)
    except ListenError:
        main.close()
        raise
    app.ports = PortSplit(admin.getsockname()[1])  # the real port when admin_port is 0
    _TwoPortServer(config, main, admin).run(sockets=[main, admin])
