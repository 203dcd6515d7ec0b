"""Alertmanager v4 payloads -> retrain requests (monitoring/alertmanager.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kdgate.monitoring.alertmanager import (
    MAX_ALERTS,
    TooManyAlerts,
    fingerprint,
    read_alerts,
)
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
    [request] = read_alerts(payload(alert()), now=0).requests
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
    batch = read_alerts(payload(alert(status="resolved"), foreign))
    assert batch.requests == [] and batch.skipped == []


def test_not_an_alertmanager_payload() -> None:
    with pytest.raises(ValueError, match="alerts"):
        read_alerts({"hello": "world"})


def test_same_payload_three_times_yields_one_outbox_entry(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    body = payload(alert())
    ids = []
    for _ in range(3):
        for request in read_alerts(body).requests:
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
    [request] = read_alerts(payload(again)).requests
    assert outbox.enqueue(request.payload, dedup_key=request.dedup_key, model="digits")


def test_the_same_alert_has_the_same_webhook_id_on_every_replica(tmp_path: Path) -> None:
    # Two replicas, two outboxes: Alertmanager may deliver one alert to either.
    ids = []
    for replica in ("a", "b"):
        outbox = Outbox(tmp_path / replica / "outbox.sqlite3")
        [request] = read_alerts(payload(alert())).requests
        ids.append(
            outbox.enqueue(
                request.payload,
                dedup_key=request.dedup_key,
                model=request.model,
                entry_id=request.message_id,
            )
        )
        assert [e.id for e in outbox.entries()] == ids[-1:]
    assert ids[0] is not None and ids[0] == ids[1]
    assert ids[0].startswith("msg_") and len(ids[0]) == 36
    again = alert()
    again["startsAt"] = "2026-11-24T09:00:00.000Z"
    assert read_alerts(payload(again)).requests[0].message_id != ids[0]


def _fnv1a_64(data: bytes) -> int:
    digest = 0xCBF29CE484222325
    for byte in data:
        digest = ((digest ^ byte) * 0x100000001B3) % 2**64
    return digest


def test_fingerprint_is_alertmanagers_label_hash() -> None:
    labels = {"slo": "kl_mean", "alertname": "A", "model": "digits", "zone": "\u00e9"}
    # prometheus/common model.LabelSet.Fingerprint: sorted names, name 0xff value 0xff, FNV-1a.
    joined = b"".join(
        name.encode() + b"\xff" + labels[name].encode() + b"\xff" for name in sorted(labels)
    )
    assert fingerprint(labels) == f"{_fnv1a_64(joined):016x}"
    assert fingerprint({}) == f"{0xCBF29CE484222325:016x}"  # the empty label set's signature


def test_alerts_without_fingerprint_get_one_from_their_labels() -> None:
    first, second = alert(slo="agreement"), alert(slo="kl_mean")
    for bare in (first, second):
        del bare["fingerprint"], bare["startsAt"]
    keys = [r.dedup_key for r in read_alerts(payload(first, second)).requests]
    assert keys == [
        f"alertmanager:{fingerprint(first['labels'])}:",
        f"alertmanager:{fingerprint(second['labels'])}:",
    ]
    assert keys[0] != keys[1]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"labels": [["model", "digits"]]}, "alerts[0].labels must be an object"),
        ({"labels": {"model": 5}}, "alerts[0].labels.model must be a string"),
        ({"annotations": "observed=1"}, "alerts[0].annotations must be an object"),
        ({"startsAt": 17}, "alerts[0].startsAt must be a string"),
    ],
)
def test_malformed_alerts_are_refused(change: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError, match=re.escape(where)):
        read_alerts(payload({**alert(), **change}))
    with pytest.raises(ValueError, match=r"alerts\[0\] must be an object"):
        read_alerts(payload("firing"))  # type: ignore[arg-type]


def test_unserved_models_are_skipped_and_too_many_alerts_refused() -> None:
    batch = read_alerts(payload(alert(model="cats"), alert()), served={"digits"})
    assert [r.model for r in batch.requests] == ["digits"]
    assert [(s.index, s.reason) for s in batch.skipped] == [(0, "model 'cats' is not served here")]
    read_alerts(payload(*[alert()] * MAX_ALERTS))
    with pytest.raises(TooManyAlerts, match="max_alerts"):
        read_alerts(payload(*[alert()] * (MAX_ALERTS + 1)))
