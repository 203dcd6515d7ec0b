"""The durable SQLite outbox (monitoring/outbox.py)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from kdgate.monitoring.outbox import Outbox, OutboxUnavailable
from kdgate.monitoring.webhook import retrain_payload


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


# -- one request per incident: breaches of one model within the group wait travel together ----

INVERTED_DIGITS = ["agreement", "kl_mean", "ece_teacher", "drift_share"]


def payload(slo: str, model: str = "digits") -> dict[str, Any]:
    """A retrain payload naming one breach of `slo`, as the monitor hands it over."""
    breach = {"slo": slo, "observed": 0.5, "objective": 0.05, "window_seconds": 300, "samples": 500}
    return retrain_payload(model, [breach], student_version="1", teacher_version="1")


def breach(outbox: Outbox, slo: str, model: str = "digits", group_wait: float = 60) -> Any:
    return outbox.enqueue_breach(
        model, slo, payload(slo, model), cooldown_seconds=3600, group_wait_seconds=group_wait
    )


def test_breaches_of_one_model_within_the_group_wait_are_one_request(
    outbox: Outbox, clock: FakeClock
) -> None:
    opened = clock.now
    first = breach(outbox, "agreement")
    assert first is not None and not first.joined and first.sends_at == opened + 60
    other = breach(outbox, "kl_mean", model="other")  # another model: its own incident
    assert other is not None and other.entry_id != first.entry_id
    for seconds, slo in [(0, "kl_mean"), (1, "ece_teacher"), (58, "drift_share")]:
        clock.now = opened + seconds
        joined = breach(outbox, slo)
        assert joined is not None and joined.joined and joined.entry_id == first.entry_id
        assert outbox.claim_due() == []  # the incident is open: nothing is sent yet
    assert breach(outbox, "kl_mean") is None  # already in the open incident

    clock.now = opened + 60
    entry, other_entry = outbox.claim_due()
    assert (entry.id, other_entry.id) == (first.entry_id, other.entry_id)
    assert [b["slo"] for b in entry.payload["data"]["breaches"]] == INVERTED_DIGITS
    assert "follows" not in entry.payload["data"]
    sealed = outbox.get(entry.id)
    assert sealed is not None and sealed.open_until is None and entry.open_until == opened + 60
    outbox.mark_delivered(entry.id)
    outbox.mark_delivered(other_entry.id)

    # Sealed: a later breach of another SLO is a follow-up naming the first request.
    clock.now += 1
    follow_up = breach(outbox, "p95_latency")
    assert follow_up is not None and not follow_up.joined
    assert follow_up.follows == first.entry_id
    clock.now += 30
    assert breach(outbox, "ece_label").entry_id == follow_up.entry_id  # type: ignore[union-attr]
    clock.now += 30
    (late,) = outbox.claim_due()
    assert late.id == follow_up.entry_id
    assert late.payload["data"]["follows"] == first.entry_id
    assert [b["slo"] for b in late.payload["data"]["breaches"]] == ["p95_latency", "ece_label"]
    # A follow-up of the follow-up still names the incident's first request.
    outbox.mark_delivered(late.id)
    clock.now += 3000
    assert breach(outbox, "agreement") is None  # its cooldown has not passed
    clock.now += 500
    again = breach(outbox, "agreement")  # past the first request's cooldown, not the follow-up's
    assert again is not None and again.follows == first.entry_id


def test_without_a_group_wait_a_breach_is_due_at_once(outbox: Outbox, clock: FakeClock) -> None:
    first = breach(outbox, "agreement", group_wait=0)
    assert first is not None
    second = breach(outbox, "kl_mean", group_wait=0)
    assert second is not None and second.entry_id != first.entry_id
    assert second.follows == first.entry_id
    assert [e.id for e in outbox.claim_due()] == [first.entry_id, second.entry_id]


def test_an_open_incident_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = breach(Outbox(path, clock=clock), "agreement")
    assert first is not None
    clock.now += 20
    reopened = Outbox(path, clock=clock)  # the process restarted within the window
    assert reopened.claim_due() == []
    joined = breach(reopened, "drift_share")
    assert joined is not None and joined.entry_id == first.entry_id
    clock.now += 40
    (entry,) = reopened.claim_due()
    assert entry.id == first.entry_id
    assert [b["slo"] for b in entry.payload["data"]["breaches"]] == ["agreement", "drift_share"]


def test_a_file_of_an_older_kdgate_is_upgraded_in_place(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE outbox (id TEXT PRIMARY KEY, dedup_key TEXT NOT NULL UNIQUE,
            model TEXT NOT NULL, slo TEXT, created REAL NOT NULL, next_attempt_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending',
            payload TEXT NOT NULL, last_error TEXT, finished_at REAL);
        INSERT INTO outbox (id, dedup_key, model, slo, created, next_attempt_at, payload)
            VALUES ('msg_old', 'k', 'digits', 'kl_mean', 1, 1, '{"x": 1}');
        """
    )
    db.close()
    outbox = Outbox(path, clock=clock)
    assert breach(outbox, "agreement") is not None
    assert [(e.id, e.payload) for e in outbox.claim_due()] == [("msg_old", {"x": 1})]


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


def test_claim_leases_the_named_undelivered_entries_due_or_not(
    outbox: Outbox, clock: FakeClock
) -> None:
    pending, later, delivered, failed = (
        outbox.enqueue({"n": n}, dedup_key=f"k{n}", model="digits") for n in range(4)
    )
    assert pending and later and delivered and failed
    outbox.schedule_retry(later, clock.now + 3600, "HTTP 503")  # not due for an hour
    outbox.mark_delivered(delivered)
    outbox.mark_failed(failed, "too old")
    outbox.enqueue({"n": 9}, dedup_key="other", model="digits")  # not named: not claimed

    claimed = outbox.claim([pending, later, delivered, failed, "msg_unknown"], lease_seconds=10)

    assert sorted(e.id for e in claimed) == sorted([pending, later, failed])
    for entry_id in (pending, later, failed):
        entry = outbox.get(entry_id)
        assert entry is not None
        assert (entry.status, entry.next_attempt_at) == ("pending", clock.now + 10)
    # Leased: the notifier's next round does not send them at the same time.
    assert [e.payload for e in outbox.claim_due()] == [{"n": 9}]
    assert outbox.claim([], lease_seconds=10) == []
