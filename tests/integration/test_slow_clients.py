"""Clients that never finish their body, on a real server: 408 and closed, others unaffected."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.support.live_server import LiveServer, live_server
from tests.support.traffic import TOKEN, infer_body, write_admin_config

pytestmark = pytest.mark.integration

BODY_TIMEOUT = 1.0  # server.body_timeout_seconds of the server under test
SLACK = 4.0  # for a busy machine: answered within BODY_TIMEOUT + SLACK of the headers
STALLED_INFER = 200  # connections stalled on the inference fast path

# (method, path, extra headers) of every route that reads a body
ROUTES = [
    ("POST", "/v2/models/digits/infer", ""),
    ("POST", "/v2/models/digits/versions/1/infer", ""),
    ("POST", "/v1/models/digits:predict", ""),
    ("POST", "/v2/models/digits/feedback", ""),
    ("PUT", "/admin/models/digits/traffic", f"Authorization: Bearer {TOKEN}\r\n"),
    ("POST", "/admin/models/digits/traffic/promote", f"Authorization: Bearer {TOKEN}\r\n"),
    ("POST", "/admin/models/digits/versions", f"Authorization: Bearer {TOKEN}\r\n"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("slow")
    config = write_admin_config(directory, {"1": 100})
    data = yaml.safe_load(config.read_text())
    data["server"]["body_timeout_seconds"] = BODY_TIMEOUT
    config.write_text(yaml.safe_dump(data))
    with live_server(config) as running:
        yield running


def stall(server: LiveServer, method: str, path: str, headers: str, sent: bytes) -> socket.socket:
    """A connection that sends its headers and `sent` of a longer body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: 4000\r\n{headers}\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def chunked_stall(server: LiveServer) -> socket.socket:
    """A chunked upload that stops in the middle of its second chunk."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"inp\r\n40\r\nuts": ['
    )
    return sock


def answer(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (before `deadline`)."""
    received = b""
    with sock:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"still open at the deadline; got {received!r}") from None
            if not chunk:
                return received
            received += chunk


def test_stalled_bodies_are_408_and_closed_while_other_requests_are_served(
    server: LiveServer,
) -> None:
    started = time.monotonic()
    stalled = [
        stall(server, "POST", "/v2/models/digits/infer", "", b'{"inputs": [')
        for _ in range(STALLED_INFER)
    ]
    stalled += [stall(server, *route, b"") for route in ROUTES]  # headers only, no body yet
    stalled += [stall(server, *route, b'{"a') for route in ROUTES]
    stalled.append(chunked_stall(server))
    opened = time.monotonic()

    # Meanwhile, a whole request on another connection is answered at once.
    before = time.monotonic()
    normal = httpx.post(f"{server.url}/v2/models/digits/infer", json=infer_body(), timeout=10)
    assert normal.status_code == 200, normal.text
    assert time.monotonic() - before < BODY_TIMEOUT

    deadline = opened + BODY_TIMEOUT + SLACK
    for sock in stalled:
        reply = answer(sock, deadline)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), reply
        assert b"connection: close" in head.lower(), reply
        assert "body_timeout_seconds" in json.loads(body)["error"]
    # Not before the deadline either: the body had that long to arrive.
    assert time.monotonic() - started >= BODY_TIMEOUT
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def test_a_body_sent_in_pieces_within_the_deadline_is_served(server: LiveServer) -> None:
    body = json.dumps(infer_body()).encode()
    piece = len(body) // 4 + 1
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    for start in range(0, len(body), piece):
        time.sleep(BODY_TIMEOUT / 10)
        sock.sendall(body[start : start + piece])
    reply = answer(sock, time.monotonic() + SLACK)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
