"""Overload protection on a real uvicorn server: in-flight limit and request deadline.

The app runs in this process (in a uvicorn thread) so that a slow student can be injected
through `create_app(student_loader=...)`. Every excess request must get a 503 with Retry-After
and a JSON error at once; none may hang, none may be a 500.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from kdgate.service.app import KdgateApp, create_app
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import ServerSettings, StudentSettings, load_settings
from kdgate.service.state import load_student
from tests.support.tiny_model import write_config

pytestmark = pytest.mark.integration

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
).encode()
INFER = "/v2/models/digits/infer"


@contextmanager
def serving(app: KdgateApp, deadline_seconds: float = 60.0) -> Iterator[str]:
    """`app` on a real uvicorn server on 127.0.0.1 (a port the OS picked), in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", http="httptools")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + deadline_seconds
    try:
        while not (server.started and httpx.get(f"{url}/v2/health/ready").status_code == 200):
            assert thread.is_alive() and time.monotonic() < deadline, "server never got ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class SlowStudent:
    """A loader whose students take `seconds` per run (blocking, as a big model's run does)
    once `armed`; warm-up runs at full speed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = threading.Event()

    def __call__(self, student: StudentSettings, server: ServerSettings) -> StudentSession:
        session = load_student(student, server)
        run = session.run

        def slow_run(inputs):  # type: ignore[no-untyped-def]
            if self.armed.is_set():
                time.sleep(self.seconds)
            return run(inputs)

        setattr(session, "run", slow_run)  # noqa: B010 - the seam the batcher looks up per run
        return session


def app_for(tmp_path: Path, loader: SlowStudent | None = None, **server: object) -> KdgateApp:
    settings = load_settings(write_config(tmp_path, **server))
    return create_app(settings, registry=CollectorRegistry(), student_loader=loader or load_student)


def hold_open(url: str) -> socket.socket:
    """A request whose body never finishes: it stays in flight until the socket sends more."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n"
    sock.sendall(head.encode() + BODY[:10])
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def requests_total(url: str, code: int) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kdgate_requests_total{") and f'code="{code}"' in line
    )


def all_at_once(url: str, clients: int) -> list[httpx.Response]:
    """One inference request from each of `clients` threads, sent together (20 s deadline)."""
    barrier = threading.Barrier(clients)

    def client(_: int) -> httpx.Response:
        with httpx.Client(timeout=20) as http:
            # A kept-alive connection, as client pools hold: the requests then reach the
            # server together (a fresh connection is accepted one per loop iteration).
            http.get(url + "/v2/health/live")
            barrier.wait(timeout=20)
            return http.post(url + INFER, content=BODY)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(client, range(clients)))


def wait_in_flight(app: KdgateApp, count: int) -> None:
    deadline = time.monotonic() + 10
    while app.guard.in_flight < count:
        assert time.monotonic() < deadline, f"{app.guard.in_flight} in flight, not {count}"
        time.sleep(0.01)


def test_requests_over_the_limit_get_503_with_retry_after_at_once(tmp_path: Path) -> None:
    app = app_for(tmp_path, max_in_flight=2)
    with serving(app) as url:
        held = [hold_open(url) for _ in range(2)]
        wait_in_flight(app, 2)
        started = time.monotonic()
        refused = httpx.post(url + INFER, content=BODY, headers={"x-request-id": "over-1"})
        assert time.monotonic() - started < 2.0  # answered at once, not queued
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-request-id"] == "over-1"
        assert "max_in_flight" in refused.json()["error"]
        for sock in held:  # the requests in flight finish normally
            sock.sendall(BODY[10:])
            status, _, body = read_response(sock)
            assert status == 200, body
            sock.close()
        assert httpx.post(url + INFER, content=BODY).status_code == 200  # a slot is free again
        assert requests_total(url, 503) == 1


def test_a_slow_student_under_concurrent_clients_sheds_load_and_never_hangs(
    tmp_path: Path,
) -> None:
    slow = SlowStudent(seconds=0.3)
    app = app_for(tmp_path, slow, max_in_flight=2)
    with serving(app) as url:
        slow.armed.set()
        answers = all_at_once(url, clients=12)
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers["retry-after"] == "1"
                assert "error" in answer.json()
        slow.armed.clear()
        assert requests_total(url, 503) == codes.count(503)
        assert requests_total(url, 500) == 0


def test_a_request_past_its_deadline_gets_503(tmp_path: Path) -> None:
    app = app_for(tmp_path, request_timeout_seconds=0.5)
    with serving(app) as url:
        sock = hold_open(url)
        started = time.monotonic()
        status, headers, body = read_response(sock)
        waited = time.monotonic() - started
        sock.close()
        assert status == 503
        assert "deadline" in json.loads(body)["error"]
        assert headers["retry-after"] == "1"
        assert 0.4 < waited < 5.0
        assert app.guard.in_flight == 0
        assert httpx.post(url + INFER, content=BODY).status_code == 200
        assert requests_total(url, 503) == 1


def test_waiting_behind_a_slow_student_past_the_deadline_answers_503(tmp_path: Path) -> None:
    """Requests batched behind a run longer than the deadline are refused, not kept waiting."""
    slow = SlowStudent(seconds=0.6)
    app = app_for(tmp_path, slow, request_timeout_seconds=0.3)
    with serving(app) as url:
        slow.armed.set()
        codes = sorted(a.status_code for a in all_at_once(url, clients=6))
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes, codes
        assert app.guard.in_flight == 0
