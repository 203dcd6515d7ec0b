"""`webhook.hook_ack: delivered` on a real gateway: the Alertmanager hook answers 2xx only once
the retrain receiver has the request, 503 otherwise, with one webhook-id for every attempt."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from kdgate.monitoring.alertmanager import message_id
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.webhook import WebhookConfig
from stack.receiver import reserve_port, webhook_receiver
from tests.support.gateway import TOKEN, write_slo_config
from tests.support.live_server import LiveServer, live_server

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"kdgate hook ack test signing key").decode()
STARTS_AT = "2026-03-04T05:06:07.089Z"
FINGERPRINT = "a1b2c3d4e5f60718"
BODY: dict[str, Any] = {
    "version": "4",
    "status": "firing",
    "receiver": "kdgate-retrain",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "KdgateKLDivergenceHigh",
                "model": "digits",
                "version": "1",
                "slo": "kl_mean",
                "severity": "ticket",
            },
            "annotations": {"observed": "0.4", "objective": "0.05"},
            "startsAt": STARTS_AT,
            "fingerprint": FINGERPRINT,
        }
    ],
}
EXPECTED_ID = message_id(f"alertmanager:{FINGERPRINT}:{STARTS_AT}")


def delivered_config(directory: Path, receiver_url: str) -> Path:
    path = write_slo_config(directory, webhook_url=receiver_url, secret=SECRET)
    config = yaml.safe_load(path.read_text())
    config["webhook"].update(hook_ack="delivered", hook_deadline_seconds=2)
    config["slo"]["min_samples"] = 10**9  # no local breach: only the hook makes requests
    path.write_text(yaml.safe_dump(config))
    return path


def post(gateway: LiveServer) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/hooks/alertmanager",
        json=BODY,
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )


def test_receiver_up_the_hook_answers_200_after_exactly_one_delivery(tmp_path: Path) -> None:
    with (
        webhook_receiver(SECRET) as receiver,
        live_server(delivered_config(tmp_path, receiver.url)) as gateway,
    ):
        answer = post(gateway)
        # 200, not 202: the receiver already has it when the hook answers.
        assert answer.status_code == 200, answer.text
        assert answer.json()["delivered"] == [EXPECTED_ID]
        assert [d.id for d in receiver.received()] == [EXPECTED_ID]
        again = post(gateway)  # Alertmanager's repeat: nothing is sent twice
        assert again.status_code == 200 and again.json()["duplicates"] == 1
        time.sleep(2)  # four notifier polls: none sends it again
        (delivery,) = receiver.received()
    assert Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert delivery.payload["data"]["breaches"][0]["slo"] == "kl_mean"


def test_receiver_down_the_hook_answers_503_and_the_retry_delivers_the_same_id(
    tmp_path: Path,
) -> None:
    sock = reserve_port()  # bound, not listening: every delivery is refused
    with (
        webhook_receiver(SECRET, sock=sock, listen=False) as receiver,
        live_server(delivered_config(tmp_path, receiver.url)) as gateway,
    ):
        started = time.monotonic()
        refused = post(gateway)
        assert refused.status_code == 503, refused.text
        assert time.monotonic() - started < 5  # within the deadline, not the HTTP timeout
        assert refused.headers["retry-after"]
        assert refused.json()["waiting"] == [EXPECTED_ID]
        assert "error" in refused.json()
        entry = Outbox(tmp_path / "outbox.sqlite3").get(EXPECTED_ID)
        assert entry is not None and entry.status == "pending"

        receiver.start()
        answer = post(gateway)  # what Alertmanager does after a 503
        assert answer.status_code == 200, answer.text
        assert answer.json()["delivered"] == [EXPECTED_ID]
        deliveries = receiver.received()
    # The notifier may have sent it too, under the same id: receivers dedupe by webhook-id.
    assert {d.id for d in deliveries} == {EXPECTED_ID}
    assert all(Webhook(SECRET).verify(d.body, d.headers) for d in deliveries)


def test_delivered_needs_a_webhook_url() -> None:
    with pytest.raises(ValueError, match=r"hook_ack is delivered but webhook\.url is not set"):
        WebhookConfig(hook_ack="delivered")
