"""The retrain worker's durable job queue: one SQLite file in the work directory.

    queue = JobQueue(work_dir / "jobs.sqlite3")
    job, new = queue.add("msg_...", "digits", body)     # idempotent by webhook-id
    job = queue.claim()                                 # oldest queued job of an idle model
    queue.set_stage(job.seq, "train"); queue.finish(job.seq, "succeeded")

A job is written (and fsynced: WAL, `synchronous=FULL`, as the outbox) before the receiver
answers 202, so an accepted request survives a crash. `claim` never hands out a job of a model
that already has one running: one retrain at a time per model. A process that dies mid-job
leaves it `running`; `recover` at the next start queues it again (up to `max_attempts` runs,
then fails it) and reports the version it had registered but not rolled out, for removal.

Every method is blocking file I/O: call it in a thread (`asyncio.to_thread`), never on the loop.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["queued", "running", "succeeded", "failed", "ignored"]
FINISHED = ("succeeded", "failed", "ignored")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id  TEXT NOT NULL UNIQUE,   -- the request's idempotency key
    model       TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN
                ('queued', 'running', 'succeeded', 'failed', 'ignored')),
    stage       TEXT,                   -- the stage running or the one that failed
    version     TEXT,                   -- the version the job builds
    registered  TEXT,                   -- registered on the gateway, rollout not started yet
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    created     REAL NOT NULL,
    started     REAL,
    finished    REAL,
    body        TEXT NOT NULL           -- the request JSON as received
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
_COLUMNS = (
    "seq, webhook_id, model, status, stage, version, registered, attempts, error, "
    "created, started, finished, body"
)


@dataclass(frozen=True)
class Job:
    """One retrain job; times are unix seconds."""

    seq: int
    webhook_id: str
    model: str
    status: Status
    stage: str | None
    version: str | None
    registered: str | None
    attempts: int
    error: str | None
    created: float
    started: float | None
    finished: float | None
    body: str

    @property
    def request(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def name(self) -> str:
        """The job's directory name under the work directory."""
        return f"job-{self.seq:06d}"

    def summary(self) -> dict[str, Any]:
        """What GET /jobs shows (the request body is in the job's directory)."""
        fields = (
            "seq", "webhook_id", "model", "status", "stage", "version", "attempts", "error",
            "created", "started", "finished",
        )  # fmt: skip
        return {"job": self.name, **{f: getattr(self, f) for f in fields}}


@dataclass(frozen=True)
class Recovered:
    """A job a previous process left running: queued again or failed; `registered` is the
    version it had registered whose rollout was never started (to be removed)."""

    job: Job
    requeued: bool
    registered: str | None


class JobQueue:
    """The queue in the SQLite file at `path` (created with its directory)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def add(
        self,
        webhook_id: str,
        model: str,
        body: str,
        *,
        status: Status = "queued",
        error: str | None = None,
    ) -> tuple[Job, bool]:
        """Store a request as a job; (the job, True) or, for a known webhook-id, (that job,
        False). `status="ignored"` records a request that starts nothing, with `error` saying
        why."""
        now = self._clock()
        finished = now if status in FINISHED else None
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (webhook_id, model, status, error, created, finished,"
                " body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (webhook_id, model, status, error, now, finished, body),
            )
            job = _one(db, "webhook_id = ?", (webhook_id,))
        assert job is not None
        return job, cursor.rowcount == 1

    def claim(self) -> Job | None:
        """The oldest queued job of a model with no running job, now running; else None."""
        with self._transaction() as db:
            job = _one(
                db,
                "status = 'queued' AND model NOT IN "
                "(SELECT model FROM jobs WHERE status = 'running') ORDER BY seq LIMIT 1",
                (),
            )
            if job is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', stage = 'start', started = ?, "
                "attempts = attempts + 1, error = NULL WHERE seq = ?",
                (self._clock(), job.seq),
            )
            return _one(db, "seq = ?", (job.seq,))

    def set_stage(self, seq: int, stage: str, *, version: str | None = None) -> None:
        """Record the stage a running job is in (and its version once known)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET stage = ?, version = COALESCE(?, version) WHERE seq = ?",
                (stage, version, seq),
            )

    def set_registered(self, seq: int, version: str | None) -> None:
        """Record a version registered but not rolled out (None: rolled out, or removed)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET registered = ? WHERE seq = ?", (version, seq))

    def finish(self, seq: int, status: Status, error: str | None = None) -> None:
        """End a job: succeeded, or failed with `error`."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished = ? WHERE seq = ?",
                (status, error, self._clock(), seq),
            )

    def recover(self, max_attempts: int) -> list[Recovered]:
        """Jobs left running by a previous process: queued again, or failed after
        `max_attempts` runs. Call once at start, before any `claim`."""
        recovered = []
        with self._transaction() as db:
            for job in _many(db, "status = 'running' ORDER BY seq", ()):
                again = job.attempts < max_attempts
                error = None if again else f"interrupted by a restart after {job.attempts} runs"
                db.execute(
                    "UPDATE jobs SET status = ?, error = ?, registered = NULL, finished = ? "
                    "WHERE seq = ?",
                    ("queued" if again else "failed", error, None if again else self._clock(),
                     job.seq),
                )  # fmt: skip
                recovered.append(Recovered(job, again, job.registered))
        return recovered

    def get(self, seq: int) -> Job | None:
        with self._connect() as db:
            return _one(db, "seq = ?", (seq,))

    def jobs(self, limit: int = 100) -> list[Job]:
        """The newest `limit` jobs, newest first."""
        with self._connect() as db:
            return _many(db, "1 ORDER BY seq DESC LIMIT ?", (limit,))

    def counts(self) -> dict[str, int]:
        """Jobs per status."""
        with self._connect() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {str(status): int(n) for status, n in rows}


def _many(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[Job]:
    rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {where}", args).fetchall()  # noqa: S608
    return [Job(*row) for row in rows]


def _one(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> Job | None:
    found = _many(db, where, args)
    return found[0] if found else None
