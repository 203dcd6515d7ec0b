"""A real webhook receiver on 127.0.0.1: kdgate's retrain webhooks and Alertmanager's notices.

    with webhook_receiver(secret) as receiver:          # listening at once on a free port
        ... receiver.url ...; receiver.wait_for(2, deadline_seconds=60)

    socket = reserve_port()                              # bound, NOT listening: connections
    with webhook_receiver(secret, sock=socket, listen=False) as receiver:   # are refused
        ...; receiver.start()                            # from now on it answers

Every POST is recorded with its path, headers, body and whether the Standard Webhooks signature
verified (`monitoring.webhook.verify`). On the retrain path the answer is 204 when it did and 401
otherwise; other paths (Alertmanager's page and ticket notices, which are not signed) get 204.
The system tests, `make stack` and the docker-compose stack's role all use this one receiver.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kdgate.monitoring.webhook import verify

RETRAIN_PATH = "/retrain"


@dataclass(frozen=True)
class Delivery:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float  # time.monotonic()

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


class Receiver:
    """Records deliveries; `start` begins answering on the already bound socket."""

    def __init__(self, secret: str, sock: socket.socket, retrain_path: str = RETRAIN_PATH) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = verify(receiver.secret, headers, body)
                with receiver._lock:
                    receiver.deliveries.append(
                        Delivery(self.path, headers, body, ok, time.monotonic())
                    )
                self.send_response(204 if ok or self.path != retrain_path else 401)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._thread: threading.Thread | None = None
        self.port: int = sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{RETRAIN_PATH}"

    def start(self) -> None:
        """Listen and answer (until the context exits)."""
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def received(self, path: str = RETRAIN_PATH) -> list[Delivery]:
        """The deliveries to `path` so far (retrain webhooks unless told otherwise)."""
        with self._lock:
            return [d for d in self.deliveries if d.path == path]

    def wait_for(
        self, count: int, *, deadline_seconds: float, path: str = RETRAIN_PATH
    ) -> list[Delivery]:
        """Poll until `count` deliveries to `path` arrived; AssertionError at the deadline."""
        deadline = time.monotonic() + deadline_seconds
        while len(got := self.received(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {count} webhooks after {deadline_seconds} s")
            time.sleep(0.1)
        return got


def reserve_port(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` (0: a free one), not listening: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextmanager
def webhook_receiver(
    secret: str, *, port: int = 0, sock: socket.socket | None = None, listen: bool = True
) -> Iterator[Receiver]:
    """A receiver on `sock` (else on `port`, 0 = free); listening at once unless `listen` is
    False (then call `start`)."""
    receiver = Receiver(secret, sock or reserve_port(port))
    if listen:
        receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
