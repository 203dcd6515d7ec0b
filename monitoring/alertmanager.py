"""Alertmanager v4 webhook payloads -> retrain requests for the outbox.

Alertmanager re-sends a firing group every `repeat_interval` and after its own restarts; the
dedup key `alertmanager:<fingerprint>:<startsAt>` makes those repeats one outbox entry, while a
new firing of the same alert (a new `startsAt`) is a new request. Resolved alerts are ignored.

    for request in retrain_requests(await request.json()):
        await asyncio.to_thread(outbox.enqueue, request.payload, dedup_key=request.dedup_key,
                                model=request.model, slo=request.slo)

Alerts carry `model`, `version` and `slo` labels (as the rules from `monitoring.rules` do); the
`observed` and `objective` annotations fill the breach when present. Alerts without a `model`
label are not about a kdgate model and are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdgate.monitoring.webhook import retrain_payload


@dataclass(frozen=True)
class RetrainRequest:
    """One outbox entry to be: where it came from (`dedup_key`) and the webhook body."""

    dedup_key: str
    model: str
    slo: str | None
    payload: dict[str, Any]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def retrain_requests(
    payload: Mapping[str, Any], *, now: float | None = None
) -> list[RetrainRequest]:
    """The retrain requests in an Alertmanager v4 webhook body (firing alerts with a model).

    Raises ValueError when the body is not an Alertmanager webhook (no `alerts` list).
    """
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise ValueError("not an Alertmanager webhook payload: 'alerts' must be a list")
    requests = []
    for alert in alerts:
        if not isinstance(alert, Mapping) or alert.get("status") != "firing":
            continue
        labels = alert.get("labels") or {}
        annotations = alert.get("annotations") or {}
        model = labels.get("model")
        if not model:
            continue
        slo = labels.get("slo")
        breach = {
            "slo": slo,
            "observed": _number(annotations.get("observed")),
            "objective": _number(annotations.get("objective")),
            "window_seconds": _number(annotations.get("window_seconds")),
            "samples": _number(annotations.get("samples")),
            "alertname": labels.get("alertname"),
            "severity": labels.get("severity"),
        }
        links = {"alert": alert["generatorURL"]} if alert.get("generatorURL") else {}
        if annotations.get("runbook_url"):
            links["runbook"] = annotations["runbook_url"]
        body = retrain_payload(
            model,
            [breach],
            student_version=labels.get("version"),
            teacher_version=labels.get("teacher_version"),
            links=links,
            now=now,
        )
        dedup_key = f"alertmanager:{alert.get('fingerprint', '')}:{alert.get('startsAt', '')}"
        requests.append(RetrainRequest(dedup_key, model, slo, body))
    return requests
