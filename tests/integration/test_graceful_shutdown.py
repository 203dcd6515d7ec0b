"""SIGTERM lets an in-flight request finish, then the server exits cleanly."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.support.live_server import live_server
from tests.support.tiny_model import write_config

pytestmark = pytest.mark.integration


def test_sigterm_finishes_the_request_in_flight(tmp_path: Path) -> None:
    body = json.dumps(
        {"id": "last", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": [1.0] * 64}]}
    ).encode()  # fmt: skip
    with live_server(write_config(tmp_path)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            head = (
                f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            sock.sendall(head + body[:20])  # the request is now in flight
            time.sleep(0.2)  # let the server read the head; nothing to poll for here
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _accepts(server.port):  # shutdown has begun once the listener is closed
                assert time.monotonic() < deadline, "server kept accepting after SIGTERM"
                time.sleep(0.05)
            sock.sendall(body[20:])
            response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert b'"id":"last"' in response
        # uvicorn re-raises the captured SIGTERM once shutdown is complete.
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert any("Application shutdown complete" in line for line in server.log)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(
        next(ln.split(b":")[1] for ln in lines if ln.lower().startswith(b"content-length"))
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest
