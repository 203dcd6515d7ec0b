"""The durable SQLite outbox (monitoring/outbox.py)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from kdgate.monitoring.outbox import Outbox


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Outbox:
    return Outbox(tmp_path / "state" / "outbox.sqlite3", clock=clock)


def test_file_is_wal(outbox: Outbox) -> None:
    db = sqlite3.connect(outbox.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_enqueue_is_idempotent_by_dedup_key(outbox: Outbox) -> None:
    first = outbox.enqueue({"a": 1}, dedup_key="k1", model="digits")
    assert first is not None and first.startswith("msg_")
    assert outbox.enqueue({"a": 2}, dedup_key="k1", model="digits") is None
    entries = outbox.entries()
    assert [e.id for e in entries] == [first]
    assert entries[0].payload == {"a": 1}
    # Still refused once delivered: a dedup key is never reused.
    outbox.mark_delivered(first)
    assert outbox.enqueue({"a": 3}, dedup_key="k1", model="digits") is None


def test_concurrent_enqueues_of_one_key_store_one_entry(outbox: Outbox) -> None:
    ids: list[str | None] = []
    threads = [
        threading.Thread(target=lambda: ids.append(outbox.enqueue({}, dedup_key="k", model="m")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([i for i in ids if i]) == 1
    assert len(outbox.entries()) == 1


def test_breach_cooldown_per_model_and_slo(outbox: Outbox, clock: FakeClock) -> None:
    assert outbox.enqueue_breach("digits", "kl_mean", {}, cooldown_seconds=3600)
    clock.now += 3599
    assert outbox.enqueue_breach("digits", "kl_mean", {}, cooldown_seconds=3600) is None
    # Other SLOs and other models have their own cooldown.
    assert outbox.enqueue_breach("digits", "agreement", {}, cooldown_seconds=3600)
    assert outbox.enqueue_breach("other", "kl_mean", {}, cooldown_seconds=3600)
    clock.now += 2
    assert outbox.enqueue_breach("digits", "kl_mean", {}, cooldown_seconds=3600)
    assert len(outbox.entries()) == 4


def test_claim_due_leases_and_orders(outbox: Outbox, clock: FakeClock) -> None:
    a = outbox.enqueue({"n": 1}, dedup_key="a", model="m")
    clock.now += 1
    b = outbox.enqueue({"n": 2}, dedup_key="b", model="m")
    assert [e.id for e in outbox.claim_due(lease_seconds=60)] == [a, b]
    assert outbox.claim_due() == []  # leased
    clock.now += 61
    assert [e.id for e in outbox.claim_due()] == [a, b]  # lease expired: the deliverer died


def test_retry_and_finish(outbox: Outbox, clock: FakeClock) -> None:
    entry_id = outbox.enqueue({}, dedup_key="a", model="m")
    assert entry_id
    outbox.claim_due()
    outbox.schedule_retry(entry_id, clock.now + 30, "HTTP 500")
    entry = outbox.get(entry_id)
    assert entry and entry.attempts == 1 and entry.last_error == "HTTP 500"
    clock.now += 29
    assert outbox.claim_due() == []
    clock.now += 1
    assert [e.id for e in outbox.claim_due()] == [entry_id]
    outbox.mark_failed(entry_id, "too old")
    entry = outbox.get(entry_id)
    assert entry and entry.status == "failed" and entry.attempts == 2
    clock.now += 10_000
    assert outbox.claim_due() == []


def test_state_survives_a_new_outbox_on_the_same_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    entry_id = Outbox(path, clock=clock).enqueue({"x": 1}, dedup_key="a", model="m")
    reopened = Outbox(path, clock=clock)
    assert [(e.id, e.status, e.payload) for e in reopened.claim_due()] == [
        (entry_id, "pending", {"x": 1})
    ]
