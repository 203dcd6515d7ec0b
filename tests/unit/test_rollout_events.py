"""Rollout events in the retrain outbox, and the rollout record of the traffic file: events are
signed and delivered like retrain requests but not counted as them, a breach neither joins nor
follows one, and a traffic file whose running rollout names an unknown version is refused."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import ROLLOUT_KEY_PREFIX, Outbox
from kdgate.monitoring.rollout_analysis import parse_steps
from kdgate.monitoring.webhook import Notifier, WebhookConfig, retrain_payload, rollout_payload
from kdgate.service.traffic_store import RolloutRecord, TrafficEntry, TrafficStore

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"kdgate rollout events test key 01").decode()
BREACH = {"slo": "agreement", "observed": 0.8, "objective": 0.95, "window_seconds": 60}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def event(kind: str = "rollout.started") -> dict[str, object]:
    data = {"model": "digits", "candidate": "2", "incumbent": "1", "step": 0, "weight": 0}
    return rollout_payload(kind, data, now=1_700_000_000)


def test_a_rollout_event_has_the_retrain_requests_form() -> None:
    payload = event("rollout.promoted")
    assert payload == {
        "type": "rollout.promoted",
        "timestamp": "2023-11-14T22:13:20Z",
        "data": {"model": "digits", "candidate": "2", "incumbent": "1", "step": 0, "weight": 0},
    }
    with pytest.raises(ValueError, match="unknown rollout event"):
        rollout_payload("rollout.exploded", {})


def test_a_breach_neither_joins_nor_follows_a_rollout_event(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    key = f"{ROLLOUT_KEY_PREFIX}digits:rollout.started:2:1.0:0"
    assert outbox.enqueue(event(), dedup_key=key, model="digits") is not None
    assert outbox.enqueue(event(), dedup_key=key, model="digits") is None  # one per key
    payload = retrain_payload("digits", [BREACH], student_version="1", teacher_version="1")
    queued = outbox.enqueue_breach(
        "digits", "agreement", payload, cooldown_seconds=600, group_wait_seconds=0
    )
    assert queued is not None and not queued.joined and queued.follows is None
    entry = outbox.get(queued.entry_id)
    assert entry is not None and "follows" not in entry.payload["data"]


async def test_events_are_signed_and_delivered_but_not_counted_as_retrains(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.enqueue(event(), dedup_key=f"{ROLLOUT_KEY_PREFIX}x", model="digits")
    received: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    registry = CollectorRegistry()
    config = WebhookConfig(url="http://receiver.test/retrain", secret=SECRET)
    async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as client:
        notifier = Notifier(outbox, client, config, Metrics(registry))
        assert await notifier.deliver_due() == 1
    (request,) = received
    Webhook(SECRET).verify(request.content, dict(request.headers))
    counted = registry.get_sample_value(
        "kdgate_retrain_requests_total", {"model": "digits", "outcome": "delivered"}
    )
    assert not counted
    assert [e.status for e in outbox.entries()] == ["delivered"]


def record(**changes: object) -> dict[str, object]:
    steps = [s.model_dump() for s in parse_steps(["dark", 100], None)]
    base: dict[str, object] = {
        "candidate": "2",
        "incumbent": "1",
        "steps": steps,
        "started_at": 1.0,
        "step_started_at": 1.0,
    }
    return {**base, **changes}


def test_the_rollout_record_is_checked(tmp_path: Path) -> None:
    versions = [{"version": "1", "card": "a.json"}, {"version": "2", "card": "b.json"}]
    entry = TrafficEntry.model_validate(
        {"versions": versions, "weights": {"1": 100}, "rollout": record()}
    )
    assert entry.rollout is not None and entry.rollout.weight == 0 and entry.rollout.active
    with pytest.raises(ValidationError, match="both '2'"):
        RolloutRecord.model_validate(record(incumbent="2"))
    with pytest.raises(ValidationError, match="step 2 of 2 steps"):
        RolloutRecord.model_validate(record(step=2))
    with pytest.raises(ValidationError, match=r"names versions \['2'\] not listed"):
        TrafficEntry.model_validate(
            {"versions": versions[:1], "weights": {"1": 100}, "rollout": record()}
        )
    # Over: its versions may go.
    TrafficEntry.model_validate(
        {"versions": versions[:1], "weights": {"1": 100}, "rollout": record(state="promoted")}
    )
    store = TrafficStore(tmp_path / "traffic.json")
    store.write(store.parse(b'{"models": {}}').model_copy(update={"models": {"m": entry}}))
    assert store.read() is not None
    read = store.read()
    assert read is not None and read.models["m"].rollout == entry.rollout
    bad = (tmp_path / "traffic.json").read_text().replace('"incumbent": "1"', '"incumbent": "9"')
    with pytest.raises(ValueError, match="not a valid traffic file"):
        store.parse(bad.encode())
