"""`kdgate serve` answers the alerts' runbook links on its main port, also when the admin routes
have their own, and a hand-written request with dot segments (which browsers and httpx remove
before sending) reaches no file."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.live_server import LiveServer, live_server
from tests.support.tiny_model import write_config

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs" / "runbooks"
ADMIN_LISTENING = re.compile(r"admin, metrics and hooks on http://127\.0\.0\.1:(\d+)")


def admin_url(server: LiveServer, deadline_seconds: float = 10.0) -> str:
    deadline = time.monotonic() + deadline_seconds
    while (match := ADMIN_LISTENING.search(server.output())) is None:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    return f"http://127.0.0.1:{match.group(1)}"


def raw_get(url: str, target: str, deadline_seconds: float = 10.0) -> tuple[int, bytes]:
    """GET `target` exactly as written (HTTP/1.1, Connection: close): status and body."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=deadline_seconds) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_runbooks_on_the_main_port_and_dot_segments_reach_nothing(tmp_path: Path) -> None:
    with live_server(write_config(tmp_path, admin_port=0)) as server:
        main, admin = server.url, admin_url(server)
        page = httpx.get(f"{main}/runbooks/latency.md")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/markdown; charset=utf-8"
        assert page.content == (DOCS / "latency.md").read_bytes()
        assert httpx.get(f"{admin}/runbooks/latency.md").status_code == 404
        assert httpx.get(f"{main}/runbooks").json()["runbooks"]
        for target in [
            "/runbooks/../README.md",
            "/runbooks/..%2FREADME.md",
            "/runbooks/%2e%2e/%2e%2e/pyproject.toml",
            "/runbooks/..",
        ]:
            status, body = raw_get(main, target)
            assert status == 404, (target, body)
            assert b'"error"' in body
