"""The durable outbox: retrain requests written to SQLite before anything tries to deliver them.

A request is enqueued once (idempotent by `dedup_key`), and the notifier (`monitoring.webhook`)
delivers it until the receiver answers 2xx, across restarts: the entry's `id` is the
`webhook-id` header, so every retry — also after a crash — carries the same idempotency key.

    outbox = Outbox(Path("state/outbox.sqlite3"))
    entry_id = outbox.enqueue_breach("digits", "kl_mean", payload, cooldown_seconds=3600)
    outbox.enqueue(payload, dedup_key="alertmanager:<fingerprint>:<startsAt>", model="digits")

Every method is blocking file I/O (and an fsync on commit): call it from a worker thread
(`await asyncio.to_thread(outbox.enqueue, ...)`), never on the event loop. Each call opens its own
connection, so calls from different threads never share one.

Durability: WAL journal with `synchronous=FULL`. In WAL mode NORMAL survives a process crash
(SIGKILL) but may lose the last commits on power loss; FULL syncs the WAL on every commit. The
outbox writes a handful of rows per hour, so the fsync costs nothing that matters, and "never
lost" holds for power loss too.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["pending", "delivered", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id              TEXT PRIMARY KEY,      -- the webhook-id, stable across retries
    dedup_key       TEXT NOT NULL UNIQUE,  -- enqueue is idempotent by this key
    model           TEXT NOT NULL,
    slo             TEXT,                  -- set for monitor breaches: the cooldown key
    created         REAL NOT NULL,         -- unix seconds
    next_attempt_at REAL NOT NULL,         -- unix seconds
    attempts        INTEGER NOT NULL DEFAULT 0,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    payload         TEXT NOT NULL,         -- the exact JSON body that is signed and sent
    last_error      TEXT,
    finished_at     REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_cooldown ON outbox (model, slo, created);
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One retrain request. Times are unix seconds; `body` is the exact bytes to sign and POST."""

    id: str
    dedup_key: str
    model: str
    slo: str | None
    created: float
    next_attempt_at: float
    attempts: int
    status: Status
    body: bytes
    last_error: str | None

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


def new_message_id() -> str:
    """A fresh webhook-id (`msg_` + 32 hex characters)."""
    return f"msg_{uuid.uuid4().hex}"


class Outbox:
    """SQLite outbox at `path` (created with its parent directory). `clock` returns unix seconds."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit mode; writes that read first use BEGIN IMMEDIATE so the read and the write
        # are one atomic step even with several processes on the same file.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def enqueue(
        self,
        payload: Mapping[str, Any],
        *,
        dedup_key: str,
        model: str,
        slo: str | None = None,
        cooldown_seconds: float | None = None,
    ) -> str | None:
        """Store a request; return its id, or None when refused.

        Refused when an entry with `dedup_key` exists (any status), or, with `cooldown_seconds`,
        when an entry for the same (model, slo) was created less than that many seconds ago.
        """
        now = self._clock()
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        entry_id = new_message_id()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if (
                    cooldown_seconds is not None
                    and db.execute(
                        "SELECT 1 FROM outbox WHERE model = ? AND slo IS ? AND created > ? LIMIT 1",
                        (model, slo, now - cooldown_seconds),
                    ).fetchone()
                ):
                    db.execute("ROLLBACK")
                    return None
                cursor = db.execute(
                    "INSERT INTO outbox (id, dedup_key, model, slo, created, next_attempt_at,"
                    " payload) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedup_key) DO NOTHING",
                    (entry_id, dedup_key, model, slo, now, now, body),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return entry_id if cursor.rowcount == 1 else None

    def enqueue_breach(
        self, model: str, slo: str, payload: Mapping[str, Any], *, cooldown_seconds: float
    ) -> str | None:
        """Enqueue a monitor breach unless (model, slo) asked within `cooldown_seconds`."""
        dedup_key = f"breach:{model}:{slo}:{uuid.uuid4().hex}"
        return self.enqueue(
            payload, dedup_key=dedup_key, model=model, slo=slo, cooldown_seconds=cooldown_seconds
        )

    def claim_due(self, limit: int = 16, lease_seconds: float = 60.0) -> list[OutboxEntry]:
        """Pending entries whose `next_attempt_at` has come, oldest first, leased for delivery.

        The lease moves `next_attempt_at` forward by `lease_seconds`, so a second notifier on
        the same file skips them, and an entry whose deliverer died is retried after the lease.
        """
        now = self._clock()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?"
                    " ORDER BY next_attempt_at, created LIMIT ?",
                    (now, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE outbox SET next_attempt_at = ? WHERE id = ?",
                    [(now + lease_seconds, row[0]) for row in rows],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [_entry(row) for row in rows]

    def mark_delivered(self, entry_id: str) -> None:
        """The receiver answered 2xx."""
        self._finish(entry_id, "delivered", None)

    def mark_failed(self, entry_id: str, error: str) -> None:
        """Give up on an entry (older than the maximum age)."""
        self._finish(entry_id, "failed", error)

    def _finish(self, entry_id: str, status: Status, error: str | None) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?,"
                " finished_at = ? WHERE id = ?",
                (status, error, self._clock(), entry_id),
            )

    def schedule_retry(self, entry_id: str, next_attempt_at: float, error: str) -> None:
        """Record a failed attempt and when to try again (unix seconds)."""
        with self._connect() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                " WHERE id = ?",
                (next_attempt_at, error, entry_id),
            )

    def get(self, entry_id: str) -> OutboxEntry | None:
        """One entry by id."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM outbox WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else _entry(row)

    def entries(self, status: Status | None = None) -> list[OutboxEntry]:
        """All entries (optionally with one status), oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE ? IS NULL OR status = ? ORDER BY created",
                (status, status),
            ).fetchall()
        return [_entry(row) for row in rows]


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    (entry_id, dedup_key, model, slo, created, next_at, attempts, status, payload, error, _) = row
    return OutboxEntry(
        id=entry_id,
        dedup_key=dedup_key,
        model=model,
        slo=slo,
        created=created,
        next_attempt_at=next_at,
        attempts=attempts,
        status=status,
        body=payload.encode(),
        last_error=error,
    )
