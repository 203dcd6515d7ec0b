"""The durable SQLite outbox (monitoring/outbox.py)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from kdgate.monitoring.outbox import Outbox, OutboxUnavailable


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


# -- faults: a lost or damaged file is recreated, anything else is OutboxUnavailable ----------


def _breach(outbox: Outbox, key: str) -> str | None:
    return outbox.enqueue({"n": key}, dedup_key=key, model="digits")


def _remove(outbox: Outbox) -> None:
    for suffix in ("", "-wal", "-shm"):
        outbox.path.with_name(outbox.path.name + suffix).unlink(missing_ok=True)


def test_a_deleted_file_is_recreated_and_logged(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    assert _breach(outbox, "before")
    _remove(outbox)
    entry = _breach(outbox, "after")
    assert entry is not None and outbox.get(entry) is not None
    assert [e.dedup_key for e in outbox.entries()] == ["after"]
    assert "had disappeared" in caplog.text


def test_a_deleted_directory_is_recreated(outbox: Outbox) -> None:
    _breach(outbox, "before")
    shutil.rmtree(outbox.path.parent)
    assert _breach(outbox, "after")
    assert outbox.claim_due()[0].dedup_key == "after"


@pytest.mark.parametrize("damage", [b"this is not a database" * 100, b""])
def test_a_corrupt_or_empty_file_is_moved_aside_and_replaced(
    outbox: Outbox, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    _breach(outbox, "before")
    _remove(outbox)
    outbox.path.write_bytes(damage)
    assert _breach(outbox, "after")
    assert [e.dedup_key for e in outbox.entries()] == ["after"]
    if damage:
        (aside,) = outbox.path.parent.glob("outbox.sqlite3.corrupt-*")
        assert aside.read_bytes() == damage  # kept for a post-mortem, not deleted
        assert "is corrupt" in caplog.text
    else:
        assert "no outbox table" in caplog.text


def test_an_unusable_location_raises_outbox_unavailable_until_it_is_fixed(
    outbox: Outbox,
) -> None:
    _breach(outbox, "before")
    shutil.rmtree(outbox.path.parent)
    outbox.path.parent.write_text("a file where the directory should be")
    with pytest.raises(OutboxUnavailable, match=str(outbox.path)):
        _breach(outbox, "during")
    with pytest.raises(OutboxUnavailable):
        outbox.claim_due()
    outbox.path.parent.unlink()
    assert _breach(outbox, "during")
