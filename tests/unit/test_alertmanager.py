"""Alertmanager v4 payloads -> retrain requests (monitoring/alertmanager.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kdgate.monitoring.alertmanager import retrain_requests
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.webhook import EVENT_TYPE


def alert(status: str = "firing", fingerprint: str = "abc123", **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {
            "alertname": "KdgateKLDivergenceHigh",
            "model": "digits",
            "version": "1",
            "slo": "kl_mean",
            "severity": "ticket",
            **labels,
        },
        "annotations": {
            "observed": "0.2",
            "objective": "0.05",
            "window_seconds": "300",
            "runbook_url": "docs/runbooks/kl.md",
        },
        "startsAt": "2026-11-23T09:00:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
        "fingerprint": fingerprint,
    }


def payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="KdgateKLDivergenceHigh"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "kdgate-retrain",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def test_firing_alert_becomes_a_retrain_request() -> None:
    [request] = retrain_requests(payload(alert()), now=0)
    assert request.dedup_key == "alertmanager:abc123:2026-11-23T09:00:00.000Z"
    assert (request.model, request.slo) == ("digits", "kl_mean")
    assert request.payload["type"] == EVENT_TYPE
    data = request.payload["data"]
    assert data["model"] == "digits" and data["student_version"] == "1"
    breach = data["breaches"][0]
    assert (breach["slo"], breach["observed"], breach["objective"]) == ("kl_mean", 0.2, 0.05)
    assert data["links"]["runbook"] == "docs/runbooks/kl.md"


def test_resolved_and_foreign_alerts_are_ignored() -> None:
    foreign = alert(fingerprint="f")
    del foreign["labels"]["model"]
    assert retrain_requests(payload(alert(status="resolved"), foreign)) == []


def test_not_an_alertmanager_payload() -> None:
    with pytest.raises(ValueError, match="alerts"):
        retrain_requests({"hello": "world"})


def test_same_payload_three_times_yields_one_outbox_entry(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    body = payload(alert())
    ids = []
    for _ in range(3):
        for request in retrain_requests(body):
            ids.append(
                outbox.enqueue(
                    request.payload,
                    dedup_key=request.dedup_key,
                    model=request.model,
                    slo=request.slo,
                )
            )
    assert len([i for i in ids if i]) == 1
    assert len(outbox.entries()) == 1
    # The same alert firing again later (new startsAt) is a new request.
    again = alert()
    again["startsAt"] = "2026-11-24T09:00:00.000Z"
    [request] = retrain_requests(payload(again))
    assert outbox.enqueue(request.payload, dedup_key=request.dedup_key, model="digits")
