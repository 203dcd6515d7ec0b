"""stack/receiver.py over real HTTP: a line per delivery for the terminal, and a GET page."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from kdgate.monitoring.webhook import retrain_payload, signed_headers
from stack.receiver import MAX_BODY_BYTES, RETRAIN_PATH, Receiver, webhook_receiver

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Lines:
    """Collects the receiver's report lines (it calls from its handler threads)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, Lines, httpx.Client]]:
    lines = Lines()
    with webhook_receiver(SECRET, report=lines) as running:
        base = f"http://127.0.0.1:{running.port}"
        with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
            yield running, lines, client


def retrain_body() -> bytes:
    breaches = [
        {"slo": "agreement", "observed": 0.6213, "objective": 0.95, "window_seconds": 300},
        {"slo": "drift_share", "observed": 0.8, "objective": 0.5, "window_seconds": 300},
    ]
    payload = retrain_payload("digits", breaches, student_version="1", teacher_version="1")
    return json.dumps(payload).encode()


def page_notice() -> dict[str, object]:
    """An Alertmanager webhook body (version 4), as it posts to the page receiver."""
    labels = {
        "alertname": "KdgateAgreementBudgetBurn",
        "model": "digits",
        "version": "1",
        "slo": "agreement",
        "severity": "page",
    }
    return {
        "version": "4",
        "status": "firing",
        "receiver": "page",
        "groupLabels": {"alertname": labels["alertname"], "model": "digits"},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {},
                "startsAt": "2026-12-04T14:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "1a2b3c",
            }
        ],
    }


def test_a_signed_retrain_request_prints_one_verified_line(
    receiver: tuple[Receiver, Lines, httpx.Client],
) -> None:
    running, lines, client = receiver
    body = retrain_body()
    headers = signed_headers(SECRET, "msg_1", body, int(time.time()))
    assert client.post(RETRAIN_PATH, content=body, headers=headers).status_code == 204
    (line,) = lines.lines
    assert " retrain model=digits v1 " in line
    assert "breaches: agreement 0.6213 (objective 0.95), drift_share 0.8 (objective 0.5)" in line
    assert line.endswith("| signature verified")
    assert running.received()[0].verified


def test_a_badly_signed_retrain_request_is_refused_and_says_so(
    receiver: tuple[Receiver, Lines, httpx.Client],
) -> None:
    _, lines, client = receiver
    body = retrain_body()
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3"
    headers = signed_headers(other, "msg_2", body, int(time.time()))
    assert client.post(RETRAIN_PATH, content=body, headers=headers).status_code == 401
    (line,) = lines.lines
    assert " retrain model=digits " in line and line.endswith("| signature INVALID")


def test_page_and_ticket_notices_print_kind_alert_and_model(
    receiver: tuple[Receiver, Lines, httpx.Client],
) -> None:
    _, lines, client = receiver
    assert client.post("/alerts/page", json=page_notice()).status_code == 204
    assert client.post("/alerts/ticket", content=b"not json").status_code == 204
    page, ticket = lines.lines
    assert " page    firing KdgateAgreementBudgetBurn model=digits version=1 slo=agreement" in page
    assert page.endswith("(1 alert) | unsigned (Alertmanager)")
    assert " ticket  unreadable body (8 bytes)" in ticket


def test_get_lists_what_was_received_newest_first(
    receiver: tuple[Receiver, Lines, httpx.Client],
) -> None:
    _, lines, client = receiver
    body = retrain_body()
    headers = signed_headers(SECRET, "msg_3", body, int(time.time()))
    client.post(RETRAIN_PATH, content=body, headers=headers)
    client.post("/alerts/page", json=page_notice())

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "KdgateAgreementBudgetBurn" in page.text and "signature verified" in page.text

    listing = client.get("/anything", headers={"accept": "application/json"})
    assert listing.status_code == 200
    deliveries = listing.json()["deliveries"]
    assert [d["kind"] for d in deliveries] == ["page", "retrain"]
    assert [d["summary"] for d in deliveries] == lines.lines[::-1]
    assert deliveries[1]["verified"] is True


def test_an_oversized_body_is_refused_and_not_recorded(
    receiver: tuple[Receiver, Lines, httpx.Client],
) -> None:
    running, lines, client = receiver
    answer = client.post("/alerts/page", content=b"x" * (MAX_BODY_BYTES + 1))
    assert answer.status_code == 413
    assert running.deliveries == [] and lines.lines == []


def test_a_retrain_request_without_a_student_version_names_the_model_only(
    receiver: tuple[Receiver, Lines, httpx.Client],
) -> None:
    _, lines, client = receiver
    payload = retrain_payload("digits", [], student_version=None, teacher_version=None)
    body = json.dumps(payload).encode()
    headers = signed_headers(SECRET, "msg_4", body, int(time.time()))
    assert client.post(RETRAIN_PATH, content=body, headers=headers).status_code == 204
    (line,) = lines.lines
    assert " retrain model=digits breaches: none | signature verified" in line
