"""A real webhook receiver on 127.0.0.1: kdgate's retrain webhooks and Alertmanager's notices.

    with webhook_receiver(secret) as receiver:          # listening at once on a free port
        ... receiver.url ...; receiver.wait_for(2, deadline_seconds=60)

    socket = reserve_port()                              # bound, NOT listening: connections
    with webhook_receiver(secret, sock=socket, listen=False) as receiver:   # are refused
        ...; receiver.start()                            # from now on it answers

Every POST is recorded with its path, headers, body and whether the Standard Webhooks signature
verified (`monitoring.webhook.verify`). On the retrain path the answer is 204 when it did and 401
otherwise; other paths (Alertmanager's page and ticket notices, which are not signed) get 204.
A body over `MAX_BODY_BYTES` is refused with 413 and not recorded.

`report` (e.g. `print`) gets one line per delivery as it arrives (`describe`): what `make stack`
shows in its terminal. A GET of any path answers the list of deliveries so far, newest first:
an HTML table, or JSON when the request accepts `application/json`.
The system tests and `make stack` use this one receiver.
"""

from __future__ import annotations

import html
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kdgate.monitoring.webhook import verify

RETRAIN_PATH = "/retrain"
MAX_BODY_BYTES = 1 << 20  # kdgate's webhooks are ~1 KB; Alertmanager's notices a few KB
PAGE_ROWS = 200  # the GET page lists the newest deliveries only


@dataclass(frozen=True)
class Delivery:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float  # time.monotonic()
    wall_time: float = field(default_factory=time.time)  # seconds since the epoch

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result

    @property
    def kind(self) -> str:
        """ "retrain", "page", "ticket" (the last part of an /alerts/ path), else the path."""
        if self.path == RETRAIN_PATH:
            return "retrain"
        return self.path.removeprefix("/alerts/") if self.path.startswith("/alerts/") else self.path


def _field(value: Any, key: str) -> dict[str, Any]:
    """`value[key]` when both are JSON objects, else {} (bodies come from anyone)."""
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, dict) else {}


def _items(value: dict[str, Any], key: str) -> list[Any]:
    """`value[key]` when it is a JSON array, else []."""
    found = value.get(key)
    return found if isinstance(found, list) else []


def _breach(breach: Any) -> str:
    if not isinstance(breach, dict):
        return "?"
    observed, objective = breach.get("observed"), breach.get("objective")
    figures = f" {observed:.4g}" if isinstance(observed, int | float) else ""
    if isinstance(objective, int | float):
        figures += f" (objective {objective:g})"
    return f"{breach.get('slo', '?')}{figures}"


def describe(delivery: Delivery) -> str:
    """One line for the terminal: time, kind, alert or model, breaches, signature verdict."""
    clock = time.strftime("%H:%M:%S", time.localtime(delivery.wall_time))
    try:
        payload: Any = json.loads(delivery.body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return f"{clock} {delivery.kind:<7} unreadable body ({len(delivery.body)} bytes)"
    if delivery.path == RETRAIN_PATH:
        data = _field(payload, "data")
        breaches = ", ".join(map(_breach, _items(data, "breaches"))) or "none"
        verdict = "signature verified" if delivery.verified else "signature INVALID"
        version = data.get("student_version")
        return (
            f"{clock} retrain model={data.get('model')}{f' v{version}' if version else ''} "
            f"breaches: {breaches} | {verdict}"
        )
    common = _field(payload, "commonLabels")
    alerts = _items(payload, "alerts")
    names = {str(_field(alert, "labels").get("alertname")) for alert in alerts}
    where = " ".join(f"{key}={common[key]}" for key in ("model", "version", "slo") if key in common)
    # Alertmanager does not sign its webhooks: there is no signature to verify.
    verdict = "signature verified" if delivery.verified else "unsigned (Alertmanager)"
    return (
        f"{clock} {delivery.kind:<7} {payload.get('status', '?')} "
        f"{common.get('alertname') or ','.join(sorted(names)) or '?'} {where} "
        f"({len(alerts)} alert{'s' if len(alerts) != 1 else ''}) | {verdict}"
    )


def _page(deliveries: list[Delivery], as_json: bool) -> tuple[bytes, str]:
    """The GET answer over `deliveries` (newest first): body and content type."""
    rows = [
        {
            "received": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(d.wall_time)),
            "path": d.path,
            "kind": d.kind,
            "verified": d.verified,
            "summary": describe(d),
        }
        for d in deliveries
    ]
    if as_json:
        return json.dumps({"deliveries": rows}).encode(), "application/json"
    cells = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(str(row[k]))}</td>" for k in ("received", "kind", "summary"))
        + "</tr>"
        for row in rows
    )
    text = (
        "<!doctype html><meta charset=utf-8><title>kdgate demo receiver</title>"
        f"<h1>kdgate demo receiver</h1><p>{len(rows)} deliveries, newest first "
        f"(retrain webhooks on {RETRAIN_PATH}, Alertmanager notices on /alerts/page and "
        "/alerts/ticket).</p><table border=1 cellpadding=4>"
        f"<tr><th>received</th><th>kind</th><th>summary</th></tr>{cells}</table>"
    )
    return text.encode(), "text/html; charset=utf-8"


class Receiver:
    """Records deliveries; `start` begins answering on the already bound socket."""

    def __init__(
        self,
        secret: str,
        sock: socket.socket,
        retrain_path: str = RETRAIN_PATH,
        *,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("content-length", 0))
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    self.send_error(413 if length > 0 else 411)
                    return
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = verify(receiver.secret, headers, body)
                delivery = Delivery(self.path, headers, body, ok, time.monotonic())
                with receiver._lock:
                    receiver.deliveries.append(delivery)
                if report is not None:  # before answering: the sender's 2xx means it is shown
                    try:
                        report(describe(delivery))
                    except Exception as exc:  # a broken terminal must not fail the delivery
                        self.log_error("report failed: %r", exc)
                self.send_response(204 if ok or self.path != retrain_path else 401)
                self.end_headers()

            def do_GET(self) -> None:
                with receiver._lock:
                    newest = receiver.deliveries[::-1][:PAGE_ROWS]
                as_json = "application/json" in self.headers.get("accept", "")
                body, content_type = _page(newest, as_json)
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
    secret: str,
    *,
    port: int = 0,
    sock: socket.socket | None = None,
    listen: bool = True,
    report: Callable[[str], None] | None = None,
) -> Iterator[Receiver]:
    """A receiver on `sock` (else on `port`, 0 = free); listening at once unless `listen` is
    False (then call `start`). `report` gets one line per delivery (`describe`)."""
    receiver = Receiver(secret, sock or reserve_port(port), report=report)
    if listen:
        receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
