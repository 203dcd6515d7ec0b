"""The durable outbox: retrain requests written to SQLite before anything tries to deliver them.

A request is enqueued once (idempotent by `dedup_key`), and the notifier (`monitoring.webhook`)
delivers it until the receiver answers 2xx, across restarts: the entry's `id` is the
`webhook-id` header, so every retry — also after a crash — carries the same idempotency key.

    outbox = Outbox(Path("state/outbox.sqlite3"))
    queued = outbox.enqueue_breach("digits", "kl_mean", payload, cooldown_seconds=3600,
                                   group_wait_seconds=60)
    outbox.enqueue(payload, dedup_key="alertmanager:<fingerprint>:<startsAt>", model="digits")

One request per incident: a monitor breach opens an *incident* entry for its model that stays
open for `group_wait_seconds` (Alertmanager's `group_wait`); the breaches of the model's other
SLOs that arrive meanwhile are appended to its `data.breaches`. The open entry is already in the
file, so a restart during the window loses nothing; it is sealed (`open_until` cleared) when the
notifier first claims it, which happens only once the window has closed, so the body never
changes after its first delivery attempt. A breach of another SLO of the same model after the
seal but within `cooldown_seconds` opens a follow-up entry whose `data.follows` names the
incident's first request.

Every method is blocking file I/O (and an fsync on commit): call it from a worker thread
(`await asyncio.to_thread(outbox.enqueue, ...)`), never on the event loop. Each call opens its own
connection, so calls from different threads never share one.

Faults: a deleted file (or directory) is recreated, a corrupt file is moved aside
(`<name>.corrupt-<time>`) and recreated, both logged as errors; any other failure (an unwritable
directory, a full disk) raises `OutboxUnavailable`, so callers can keep what they wanted to store
and try again later instead of losing it.

Durability: WAL journal with `synchronous=FULL`. In WAL mode NORMAL survives a process crash
(SIGKILL) but may lose the last commits on power loss; FULL syncs the WAL on every commit. The
outbox writes a handful of rows per hour, so the fsync costs nothing that matters, and "never
lost" holds for power loss too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

Status = Literal["pending", "delivered", "failed"]
T = TypeVar("T")
# Rollout events share the outbox (and its notifier) but are no incident: a breach neither joins
# nor follows them.
ROLLOUT_KEY_PREFIX = "rollout:"
_COMPANIONS = ("-wal", "-shm", "-journal")  # SQLite's files beside the database
_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class OutboxUnavailable(Exception):
    """The outbox cannot store or read entries now (unwritable directory, full disk, ...)."""


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
    finished_at     REAL,
    open_until      REAL                   -- unix seconds; an open incident takes breaches
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
    open_until: float | None = None  # set while the entry is an open incident

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass(frozen=True)
class BreachQueued:
    """Where `Outbox.enqueue_breach` put a breach: `entry_id` is the request's webhook-id;
    `joined` when it was added to an open incident; `sends_at` (unix seconds) when the incident
    closes and becomes deliverable; `follows` the first request of the incident it follows up."""

    entry_id: str
    joined: bool
    sends_at: float
    follows: str | None = None


def new_message_id() -> str:
    """A fresh webhook-id (`msg_` + 32 hex characters)."""
    return f"msg_{uuid.uuid4().hex}"


class Outbox:
    """SQLite outbox at `path` (created with its parent directory). `clock` returns unix seconds.

    Raises `OutboxUnavailable` (here and from every method) when the file cannot be used.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._created = False  # after the first creation, a missing file is an incident
        self._run(_upgrade)

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on a fresh connection; a deleted file is recreated, a corrupt or empty one
        repaired once; any other failure raises OutboxUnavailable."""
        damage: sqlite3.DatabaseError | None = None
        for attempt in (1, 2):
            try:
                if damage is not None:
                    self._repair(damage)
                if not self.path.is_file():
                    self._create()
                with self._connect() as db:
                    return work(db)
            except sqlite3.DatabaseError as exc:
                if attempt == 1 and _damaged(exc):
                    damage = exc
                    continue
                raise OutboxUnavailable(f"outbox {self.path}: {exc}") from exc
            except OSError as exc:  # the directory cannot be made, a file not moved
                raise OutboxUnavailable(f"outbox {self.path}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _create(self) -> None:
        lost = self._created
        if lost:
            # A stale WAL beside a new database would be replayed into it: keep it aside.
            self._move_aside(_aside(self.path, "orphan"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            db.executescript(_SCHEMA)
        self._created = True
        if lost:
            log.error(
                "outbox %s had disappeared: recreated it empty (entries it held are lost)",
                self.path,
            )

    def _repair(self, damage: sqlite3.DatabaseError) -> None:
        """After `damage` (see `_damaged`): move a corrupt file aside, or add the schema."""
        if _error_code(damage) in _CORRUPT:
            aside = _aside(self.path, "corrupt")
            self._move_aside(aside)
            self._created = False  # moved on purpose: not an incident of its own
            log.error(
                "outbox %s is corrupt (%s): moved it aside to %s and started a new one",
                self.path,
                damage,
                aside,
            )
        else:
            log.error("outbox %s has no outbox table: recreating its schema", self.path)
            self._created = False
        self._create()

    def _move_aside(self, name: str) -> None:
        """Rename the database and its companion files that exist to `name` (+ suffix)."""
        for suffix in ("", *_COMPANIONS):
            source = self.path.with_name(self.path.name + suffix)
            if source.exists():
                source.replace(self.path.with_name(name + suffix))

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
        entry_id: str | None = None,
    ) -> str | None:
        """Store a request; return its id, or None when refused.

        Refused when an entry with `dedup_key` (or `entry_id`) exists (any status), or, with
        `cooldown_seconds`, when an entry for the same (model, slo) was created less than that
        many seconds ago. `entry_id` (the webhook-id) defaults to a fresh `new_message_id()`.
        """
        now = self._clock()
        body = _dump(payload)
        new_id = entry_id or new_message_id()

        def insert(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                if (
                    cooldown_seconds is not None
                    and db.execute(
                        "SELECT 1 FROM outbox WHERE model = ? AND slo IS ? AND created > ? LIMIT 1",
                        (model, slo, now - cooldown_seconds),
                    ).fetchone()
                ):
                    return False
                cursor = db.execute(
                    "INSERT INTO outbox (id, dedup_key, model, slo, created, next_attempt_at,"
                    " payload) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (new_id, dedup_key, model, slo, now, now, body),
                )
                return cursor.rowcount == 1

        return new_id if self._run(insert) else None

    def enqueue_breach(
        self,
        model: str,
        slo: str,
        payload: Mapping[str, Any],
        *,
        cooldown_seconds: float,
        group_wait_seconds: float = 0.0,
    ) -> BreachQueued | None:
        """Store a monitor breach (`payload`: a retrain payload naming it in `data.breaches`).

        Refused (None) when a request of `model` created within `cooldown_seconds`, or its open
        incident, already names `slo`. Else the breach joins the model's open incident, or opens
        a new one that takes breaches for `group_wait_seconds` (0: none, deliverable at once).
        A new incident within the cooldown of an earlier request of the model is a follow-up:
        its payload gets `data.follows`, the webhook-id of the first request of that incident.
        """
        now = self._clock()
        group_wait = max(group_wait_seconds, 0.0)

        def store(db: sqlite3.Connection) -> BreachQueued | None:
            with _transaction(db):
                recent = db.execute(
                    "SELECT id, slo, payload, open_until FROM outbox WHERE model = ?"
                    " AND (created > ? OR open_until > ?) AND dedup_key NOT LIKE ?"
                    " ORDER BY created",
                    (model, now - cooldown_seconds, now, ROLLOUT_KEY_PREFIX + "%"),
                ).fetchall()
                if any(slo in _slos(row_slo, body) for _, row_slo, body, _ in recent):
                    return None
                open_ = [(i, body, until) for i, _, body, until in recent if until and until > now]
                if open_:
                    entry_id, body, until = open_[-1]
                    merged = json.loads(body)
                    data = merged.setdefault("data", {})
                    data["breaches"] = [*_breaches(merged), *_breaches(payload)]
                    db.execute(
                        "UPDATE outbox SET payload = ? WHERE id = ?", (_dump(merged), entry_id)
                    )
                    return BreachQueued(entry_id, True, until, data.get("follows"))
                follows = None
                if recent:
                    entry_id, _, body, _ = recent[-1]
                    data = json.loads(body).get("data")
                    follows = (data.get("follows") if isinstance(data, dict) else None) or entry_id
                document = json.loads(json.dumps(payload))
                if follows is not None:
                    document.setdefault("data", {})["follows"] = follows
                new_id = new_message_id()
                sends_at = now + group_wait
                db.execute(
                    "INSERT INTO outbox (id, dedup_key, model, slo, created, next_attempt_at,"
                    " payload, open_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        new_id,
                        f"breach:{model}:{slo}:{uuid.uuid4().hex}",
                        model,
                        slo,
                        now,
                        sends_at,
                        _dump(document),
                        sends_at if group_wait > 0 else None,
                    ),
                )
                return BreachQueued(new_id, False, sends_at, follows)

        return self._run(store)

    def claim_due(self, limit: int = 16, lease_seconds: float = 60.0) -> list[OutboxEntry]:
        """Pending entries whose `next_attempt_at` has come, oldest first, leased for delivery.

        The lease moves `next_attempt_at` forward by `lease_seconds`, so a second notifier on
        the same file skips them, and an entry whose deliverer died is retried after the lease.
        An open incident is due once its window has closed; claiming it seals it, in the same
        transaction, so no breach joins a body that may already have been sent.
        """
        now = self._clock()

        def claim(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            with _transaction(db):
                rows = db.execute(
                    "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?"
                    " ORDER BY next_attempt_at, created LIMIT ?",
                    (now, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE outbox SET next_attempt_at = ?, open_until = NULL WHERE id = ?",
                    [(now + lease_seconds, row[0]) for row in rows],
                )
            return rows

        return [_entry(row) for row in self._run(claim)]

    def claim(self, entry_ids: Sequence[str], *, lease_seconds: float) -> list[OutboxEntry]:
        """The entries `entry_ids` that are not delivered, leased for a delivery now.

        Due or not: the caller has a fresh reason to try (Alertmanager sent the alert again).
        A failed entry is made pending again for the same reason. Delivered ones are left out.
        """
        now = self._clock()
        marks = ",".join("?" * len(entry_ids))

        def claim(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            with _transaction(db):
                rows = db.execute(
                    f"SELECT * FROM outbox WHERE id IN ({marks}) AND status != 'delivered'"  # noqa: S608 - placeholders only
                    " ORDER BY created",
                    tuple(entry_ids),
                ).fetchall()
                db.executemany(
                    "UPDATE outbox SET next_attempt_at = ?, open_until = NULL,"
                    " status = 'pending' WHERE id = ?",
                    [(now + lease_seconds, row[0]) for row in rows],
                )
            return rows

        if not entry_ids:
            return []
        return [_entry(row) for row in self._run(claim)]

    def mark_delivered(self, entry_id: str) -> None:
        """The receiver answered 2xx."""
        self._finish(entry_id, "delivered", None)

    def mark_failed(self, entry_id: str, error: str) -> None:
        """Give up on an entry (older than the maximum age)."""
        self._finish(entry_id, "failed", error)

    def _finish(self, entry_id: str, status: Status, error: str | None) -> None:
        self._run(
            lambda db: db.execute(
                "UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?,"
                " finished_at = ? WHERE id = ?",
                (status, error, self._clock(), entry_id),
            )
        )

    def schedule_retry(self, entry_id: str, next_attempt_at: float, error: str) -> None:
        """Record a failed attempt and when to try again (unix seconds)."""
        self._run(
            lambda db: db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                " WHERE id = ?",
                (next_attempt_at, error, entry_id),
            )
        )

    def get(self, entry_id: str) -> OutboxEntry | None:
        """One entry by id."""
        row = self._run(
            lambda db: db.execute("SELECT * FROM outbox WHERE id = ?", (entry_id,)).fetchone()
        )
        return None if row is None else _entry(row)

    def entries(self, status: Status | None = None) -> list[OutboxEntry]:
        """All entries (optionally with one status), oldest first."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT * FROM outbox WHERE ? IS NULL OR status = ? ORDER BY created",
                (status, status),
            ).fetchall()
        )
        return [_entry(row) for row in rows]


def _dump(payload: Mapping[str, Any]) -> str:
    """The stored (and sent) JSON of a payload: compact, keys sorted."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def _breaches(document: Any) -> list[Any]:
    """`data.breaches` of a payload ([] for one without it)."""
    data = document.get("data") if isinstance(document, Mapping) else None
    breaches = data.get("breaches") if isinstance(data, Mapping) else None
    return list(breaches) if isinstance(breaches, list) else []


def _slos(slo: str | None, body: str) -> set[str | None]:
    """The SLOs an entry asks about: its `slo` column and every breach in its payload."""
    return {slo, *(b.get("slo") for b in _breaches(json.loads(body)) if isinstance(b, dict))}


def _upgrade(db: sqlite3.Connection) -> None:
    """Add the columns a file made by an older kdgate lacks (its entries stay as they are)."""
    with _transaction(db):  # two processes upgrading one file: the second finds the column
        columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
        if not columns:
            db.execute("SELECT 1 FROM outbox")  # no table: raises, and _run repairs the file
        if "open_until" not in columns:
            db.execute("ALTER TABLE outbox ADD COLUMN open_until REAL")


def _error_code(exc: sqlite3.Error) -> int:
    """The primary SQLite result code of `exc` (extended codes carry it in the low byte)."""
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether `exc` says the file is not a usable outbox (corrupt, or empty: no table)."""
    return _error_code(exc) in _CORRUPT or str(exc).startswith("no such table")


def _aside(path: Path, kind: str) -> str:
    """The name a broken outbox file is moved to: `<name>.<kind>-<UTC time>`."""
    return f"{path.name}.{kind}-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}"


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE .. COMMIT (ROLLBACK on any exception): the read and the write that
    follow are one atomic step, even with several processes on the same file."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    (entry_id, dedup_key, model, slo, created, next_at, attempts, status, payload, error) = row[:10]
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
        open_until=row[11],
    )
