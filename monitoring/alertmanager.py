"""Alertmanager v4 webhook payloads -> retrain requests for the outbox.

Alertmanager re-sends a firing group every `repeat_interval` and after its own restarts; the
dedup key `alertmanager:<fingerprint>:<startsAt>` makes those repeats one outbox entry, while a
new firing of the same alert (a new `startsAt`) is a new request. The webhook-id is derived from
that key, so every replica that receives the same alert queues it under the same id and the
receiver can deduplicate across replicas. An alert without `fingerprint` gets the one
Alertmanager would compute from its labels. Resolved alerts are ignored.

    batch = read_alerts(payload, served={"digits"})
    for request in batch.requests:
        await asyncio.to_thread(outbox.enqueue, request.payload, dedup_key=request.dedup_key,
                                model=request.model, slo=request.slo, entry_id=request.message_id)

Alerts carry `model`, `version` and `slo` labels (as the rules from `monitoring.rules` do); the
`observed` and `objective` annotations fill the breach when present. Alerts without a `model`
label are not about a kdgate model and are ignored; alerts naming a model this gateway does not
serve are skipped and reported in `batch.skipped`. A body that is not the v4 shape (labels that
are not an object of strings, ...) raises `ValueError`; more than `MAX_ALERTS` alerts raises
`TooManyAlerts`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kdgate.monitoring.webhook import retrain_payload

# Far above one rule group's alerts (a few per model and SLO); a body over it is a runaway
# group, and turning it into as many webhooks would flood the retrain receiver.
MAX_ALERTS = 1000

# prometheus/common model.LabelSet.Fingerprint: FNV-1a 64 over sorted name/value pairs.
_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEPARATOR = 0xFF


class TooManyAlerts(ValueError):
    """The body carries more than `MAX_ALERTS` alerts."""


@dataclass(frozen=True)
class RetrainRequest:
    """One outbox entry to be: where it came from (`dedup_key`), its webhook-id, and the body."""

    dedup_key: str
    message_id: str
    model: str
    slo: str | None
    payload: dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    """A firing alert that was not queued: its index in `alerts` and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class AlertBatch:
    """What one webhook body asks for: requests to queue, and firing alerts skipped."""

    requests: list[RetrainRequest] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def fingerprint(labels: Mapping[str, str]) -> str:
    """The fingerprint Alertmanager gives an alert with `labels` (16 hex digits)."""
    digest = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode():
                digest = ((digest ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
            digest = ((digest ^ _SEPARATOR) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def message_id(dedup_key: str) -> str:
    """The webhook-id of an alert's request: the same on every replica (`msg_` + 32 hex)."""
    return "msg_" + hashlib.sha256(dedup_key.encode()).hexdigest()[:32]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _strings(value: Any, where: str) -> dict[str, str]:
    """`value` as a label or annotation map; ValueError naming `where` if it is not one."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object of strings, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError(f"{where}.{key} must be a string, got {item!r:.40}")
    return dict(value)


def _text(alert: Mapping[str, Any], key: str, where: str) -> str:
    value = alert.get(key) or ""
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key} must be a string, got {value!r:.40}")
    return value


def read_alerts(
    payload: Mapping[str, Any],
    *,
    served: Collection[str] | None = None,
    captures: Mapping[str, Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> AlertBatch:
    """The retrain requests in an Alertmanager v4 webhook body (firing alerts with a model).

    `served`: the model names this gateway serves (None: any); alerts naming another model are
    skipped. `captures`: where each model's shadow capture is (`CaptureStore.describe`), as the
    gateway's own requests say it (`data.capture`). Raises ValueError when the body is not an
    Alertmanager v4 webhook, TooManyAlerts (a ValueError) when it holds more than `MAX_ALERTS`
    alerts.
    """
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise ValueError("not an Alertmanager webhook payload: 'alerts' must be a list")
    if len(alerts) > MAX_ALERTS:
        raise TooManyAlerts(
            f"{len(alerts)} alerts in one body, over the limit of {MAX_ALERTS}: set max_alerts "
            "in the Alertmanager webhook_config, or group alerts by model and slo"
        )
    batch = AlertBatch()
    for index, alert in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(alert, Mapping):
            raise ValueError(f"{where} must be an object, got {type(alert).__name__}")
        labels = _strings(alert.get("labels"), f"{where}.labels")
        annotations = _strings(alert.get("annotations"), f"{where}.annotations")
        starts_at = _text(alert, "startsAt", where)
        alert_fingerprint = _text(alert, "fingerprint", where) or fingerprint(labels)
        generator_url = _text(alert, "generatorURL", where)
        model = labels.get("model")
        if alert.get("status") != "firing" or not model:
            continue
        if served is not None and model not in served:
            batch.skipped.append(Skipped(index, f"model {model!r} is not served here"))
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
        links = {"alert": generator_url} if generator_url else {}
        if annotations.get("runbook_url"):
            links["runbook"] = annotations["runbook_url"]
        body = retrain_payload(
            model,
            [breach],
            student_version=labels.get("version"),
            teacher_version=labels.get("teacher_version"),
            links=links,
            capture=(captures or {}).get(model),
            now=now,
        )
        dedup_key = f"alertmanager:{alert_fingerprint}:{starts_at}"
        batch.requests.append(RetrainRequest(dedup_key, message_id(dedup_key), model, slo, body))
    return batch
