"""POST /v1/hooks/alertmanager on a real gateway: bearer token, dedup, one signed webhook."""

from __future__ import annotations

import base64
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stack.receiver import Receiver, webhook_receiver
from tests.support.gateway import TOKEN, write_slo_config
from tests.support.live_server import LiveServer, live_server

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"kdgate alertmanager hook test key").decode()
ALERT: dict[str, Any] = {
    "status": "firing",
    "labels": {
        "alertname": "KdgateAgreementBudgetBurn",
        "model": "digits",
        "version": "1",
        "slo": "agreement",
        "severity": "page",
    },
    "annotations": {"observed": "0.4", "objective": "0.95", "window_seconds": "300"},
    "startsAt": "2026-02-03T04:05:06.789Z",
    "endsAt": "0001-01-01T00:00:00Z",
    "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
    "fingerprint": "0123456789abcdef",
}
PAYLOAD = {
    "version": "4",
    "groupKey": '{}:{alertname="KdgateAgreementBudgetBurn"}',
    "status": "firing",
    "receiver": "kdgate-retrain",
    "groupLabels": {"alertname": "KdgateAgreementBudgetBurn"},
    "commonLabels": {},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "truncatedAlerts": 0,
    "alerts": [ALERT],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Receiver]]:
    directory = tmp_path_factory.mktemp("hook")
    with webhook_receiver(SECRET) as receiver:
        config = write_slo_config(directory, webhook_url=receiver.url, secret=SECRET)
        with live_server(config) as gateway:
            yield gateway, receiver


def post(gateway: LiveServer, body: Any, token: str | None = TOKEN) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(
        f"{gateway.url}/v1/hooks/alertmanager", json=body, headers=headers, timeout=10
    )


def test_same_payload_three_times_is_one_retrain_request(
    stack: tuple[LiveServer, Receiver],
) -> None:
    gateway, receiver = stack
    before = len(receiver.received())
    answers = [post(gateway, PAYLOAD) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [len(a.json()["queued"]) for a in answers] == [1, 0, 0]
    assert [a.json()["duplicates"] for a in answers] == [0, 1, 1]
    (delivery,) = receiver.wait_for(before + 1, deadline_seconds=20)[before:]
    assert delivery.verified
    assert delivery.id == answers[0].json()["queued"][0]
    data = delivery.payload["data"]
    assert data["model"] == "digits" and data["student_version"] == "1"
    (breach,) = data["breaches"]
    assert (breach["slo"], breach["observed"], breach["objective"]) == ("agreement", 0.4, 0.95)
    assert data["links"]["alert"] == ALERT["generatorURL"]
    # Nothing else follows: poll a few notifier rounds (poll_seconds 0.5).
    time.sleep(3)
    assert len(receiver.received()) == before + 1


def test_a_new_firing_of_the_same_alert_is_a_new_request_and_resolved_is_ignored(
    stack: tuple[LiveServer, Receiver],
) -> None:
    gateway, _ = stack
    again = copy.deepcopy(PAYLOAD)
    again["alerts"][0]["startsAt"] = "2026-02-04T00:00:00Z"
    assert len(post(gateway, again).json()["queued"]) == 1
    resolved = copy.deepcopy(PAYLOAD)
    resolved["status"] = "resolved"
    resolved["alerts"][0].update(status="resolved", startsAt="2026-02-05T00:00:00Z")
    assert post(gateway, resolved).json() == {"queued": [], "duplicates": 0, "skipped": []}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Basic dXNlcjpwYXNz"}, 401),
        ({"authorization": "Bearer"}, 401),
        ({"authorization": "Bearer not-the-token"}, 403),
        ({"authorization": f"Bearer {TOKEN}x"}, 403),
    ],
)
def test_token_is_required(
    stack: tuple[LiveServer, Receiver], headers: dict[str, str], status: int
) -> None:
    gateway, _ = stack
    answer = httpx.post(
        f"{gateway.url}/v1/hooks/alertmanager", json=PAYLOAD, headers=headers, timeout=10
    )
    assert answer.status_code == status
    assert "error" in answer.json()


def test_not_an_alertmanager_body_is_400(stack: tuple[LiveServer, Receiver]) -> None:
    gateway, _ = stack
    assert post(gateway, {"alerts": "no"}).status_code == 400
    assert post(gateway, [1, 2]).status_code == 400


def test_hook_is_off_without_an_admin_token(tmp_path: Path) -> None:
    config = write_slo_config(tmp_path, webhook_url=None, secret=None)
    text = config.read_text().replace(f"token: {TOKEN}", "token: null")
    config.write_text(text)
    with live_server(config) as gateway:
        assert post(gateway, PAYLOAD).status_code == 404
