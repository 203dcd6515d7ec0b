"""The retrain worker's job runner: train -> card -> register -> rollout, one job per model.

Stages of a job (each logged, timed and recorded in the queue as the job's `stage`):

    check     is the request answered already? A rollout of the model running or paused, or
              a version it is about that no longer serves: the job ends `ignored`, saying so
    version   the next free version of the model (GET /admin/models/{m}/versions)
    capture   with `min_capture_rows`: until the capture holds that many rows (at most
              `capture_wait_seconds`, then on with a warning)
    train     `kind: distill`: `kdgate distill --capture DIR --capture-mix train` in a child
              process (torch stays out of the worker); `kind: command`: the user's argv, no
              shell, with KDGATE_CAPTURE_DIR, KDGATE_REQUEST, KDGATE_OUT, KDGATE_MODEL and
              KDGATE_VERSION; both within the model's `deadline_seconds`, then killed
    import    `kind: command` only: `kdgate import` of $KDGATE_OUT/student.onnx against the
              model's teacher (cards, figures on the sample)
    register  POST /admin/models/{m}/versions {"card", "version"}
    rollout   POST /admin/models/{m}/rollout {"candidate": version, ...settings.rollout}

A failure at any stage fails the job (logged, counted, shown by GET /jobs with the stage and the
reason) and keeps its directory (`<work_dir>/jobs/job-NNNNNN`: request.json, the training log,
the student) for inspection. Nothing stays registered: a version whose rollout could not start
is removed again (DELETE /admin/models/{m}/versions/{v}); if the process dies between the two,
the next start removes it (`JobQueue.recover`). Children get no KDGATE_* variable of the
worker's environment: the webhook secret and the admin token stay in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from kdgate.monitoring.capture import rows_in_segment
from kdgate.service.cards import load_card
from kdgate.service.importer import ImportRequest, IncomparablePair, import_pair
from kdgate.service.retrain_command import CommandFailed, child_env, run_command
from kdgate.service.retrain_config import CommandJob, DistillJob, RetrainWorkerSettings
from kdgate.service.retrain_gateway import Gateway, GatewayError
from kdgate.service.retrain_metrics import WorkerMetrics
from kdgate.service.retrain_queue import Job, JobQueue, Status

log = logging.getLogger("kdgate.retrain")

ERROR_BACKOFF_CAP_SECONDS = 30.0
STUDENT_FILE = "student.onnx"


class JobCovered(Exception):
    """The request needs no new student; the message says what answers it."""


class JobFailed(Exception):
    """A job stage failed; the message says which and why."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")


def card_path(spec: DistillJob | CommandJob, directory: Path, version: str) -> Path:
    """Where a job in `directory` writes the student card it registers."""
    if isinstance(spec, DistillJob):
        return directory / "student" / f"student-v{version}.card.json"
    return directory / "card" / "student.card.json"


class JobRunner:
    """Claims queued jobs and runs them (`parallel` at once, never two of one model)."""

    def __init__(
        self,
        settings: RetrainWorkerSettings,
        queue: JobQueue,
        gateway: Gateway,
        metrics: WorkerMetrics,
        *,
        python: str = sys.executable,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._gateway = gateway
        self._metrics = metrics
        self._python = python
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Look for work now rather than at the next poll (call on the loop)."""
        self._wake.set()

    async def run(self) -> None:
        """Recover, then claim and run jobs forever; stop by cancelling (running jobs stop,
        their children are killed, and the next start queues them again)."""
        recovered = False
        failures = 0
        try:
            while True:
                self._wake.clear()
                wait = self._settings.poll_seconds
                try:
                    if not recovered:
                        await self._recover()
                        recovered = True
                    while len(self._tasks) < self._settings.parallel:
                        job = await asyncio.to_thread(self._queue.claim)
                        if job is None:
                            break
                        task = asyncio.create_task(self.execute(job), name=job.name)
                        self._tasks.add(task)
                        task.add_done_callback(self._done)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    wait = min(ERROR_BACKOFF_CAP_SECONDS, wait * 2**failures)
                    log.error(
                        "retrain queue round failed (%d in a row): %s: %s; next try in %.1f s",
                        failures, type(exc).__name__, exc, wait, exc_info=failures == 1,
                    )  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()  # a model is free again

    async def _recover(self) -> None:
        for found in await asyncio.to_thread(self._queue.recover, self._settings.max_attempts):
            job = found.job
            what = "queued again" if found.requeued else "failed (too many runs)"
            log.warning("%s (model %s) was interrupted by a restart: %s", job.name, job.model, what)
            if found.registered is not None:
                await self._remove(job, found.registered)
            if not found.requeued:
                self._metrics.jobs.labels(model=job.model, outcome="failed").inc()

    async def execute(self, job: Job) -> None:
        """Run one claimed job to its end and record the outcome (never raises but on cancel)."""
        directory = self._settings.work_dir / "jobs" / job.name
        self._metrics.running.inc()
        log.info("%s (model %s, webhook-id %s): started", job.name, job.model, job.webhook_id)
        error: str | None = None
        version: str | None = None
        covered: str | None = None
        try:
            version = await self._stages(job, directory)
        except JobCovered as exc:
            covered = str(exc)
        except JobFailed as exc:
            error = str(exc)
        except Exception as exc:  # a bug or an unforeseen fault: the job fails, the worker lives
            log.exception("%s: unexpected error", job.name)
            error = f"unexpected: {type(exc).__name__}: {exc}"
        finally:
            self._metrics.running.dec()
        outcome: Status = "failed" if error else "ignored" if covered else "succeeded"
        try:
            await asyncio.to_thread(self._queue.finish, job.seq, outcome, error or covered)
        except Exception as exc:
            log.error("%s: cannot record its outcome %s: %s", job.name, outcome, exc)
        self._metrics.jobs.labels(model=job.model, outcome=outcome).inc()
        if error:
            log.error("%s (model %s) failed at %s; files kept in %s", job.name, job.model,
                      error, directory)  # fmt: skip
        elif covered:
            log.info("%s (model %s) not run: %s", job.name, job.model, covered)
        else:
            log.info("%s (model %s): version %s registered, rollout started", job.name,
                     job.model, version)  # fmt: skip

    async def _stages(self, job: Job, directory: Path) -> str:
        spec = self._settings.models.get(job.model)
        if spec is None:
            raise JobFailed("start", f"no retrain is configured for model {job.model!r}")
        async with self._stage(job, "start"):
            await asyncio.to_thread(_write_request, directory, job.body)
        async with self._stage(job, "check"):
            covered = await self._covered(job)
        if covered is not None:
            raise JobCovered(covered)
        capture = _capture_dir(job.request)
        async with self._stage(job, "version"):
            version = await self._gateway.next_version(job.model)
            await asyncio.to_thread(self._queue.set_stage, job.seq, "version", version=version)
        if capture is not None and spec.min_capture_rows:
            async with self._stage(job, "capture"):
                await self._wait_for_capture(job, spec, Path(capture))
        if isinstance(spec, DistillJob):
            card = await self._distill(job, spec, directory, capture, version)
        else:
            card = await self._command(job, spec, directory, capture, version)
        # Recorded before the call: if this process dies during it, the next start removes
        # the version (when the gateway holds this job's student under it).
        await asyncio.to_thread(self._queue.set_registered, job.seq, version)
        try:
            async with self._stage(job, "register"):
                await self._gateway.register(job.model, card.resolve(), version)
            async with self._stage(job, "rollout"):
                await self._gateway.start_rollout(job.model, version, self._settings.rollout)
        except JobFailed as exc:
            cleanup = await self._remove(job, version)
            raise JobFailed(exc.stage, f"{exc.reason}; version {version} {cleanup}") from None
        await asyncio.to_thread(self._queue.set_registered, job.seq, None)
        return version

    async def _covered(self, job: Job) -> str | None:
        """Why this request needs no new student, or None. A rollout of the model in progress
        answers it (breaches arrive while the last retrain is judged); so does a rollout that
        already replaced the version the request is about."""
        rollout = await self._gateway.rollout(job.model)
        if rollout is not None and rollout.get("state") in ("running", "paused"):
            return (f"the rollout of version {rollout.get('candidate')} is {rollout['state']}; "
                    "its outcome answers this request")  # fmt: skip
        data = job.request.get("data")
        about = data.get("student_version") if isinstance(data, dict) else None
        if about is None:
            return None
        weights = await self._gateway.weights(job.model)
        if weights.get(str(about), 0) > 0:
            return None
        serving = ", ".join(v for v, w in weights.items() if w > 0) or "none"
        return f"version {about}, which the request is about, no longer serves (serving: {serving})"

    async def _wait_for_capture(
        self, job: Job, spec: DistillJob | CommandJob, capture: Path
    ) -> None:
        deadline = time.monotonic() + spec.capture_wait_seconds
        while (rows := await asyncio.to_thread(capture_rows, capture)) < spec.min_capture_rows:
            if time.monotonic() >= deadline:
                log.warning("%s: the capture holds %d rows after %.0f s, fewer than %d; "
                            "training on them", job.name, rows, spec.capture_wait_seconds,
                            spec.min_capture_rows)  # fmt: skip
                return
            await asyncio.sleep(self._settings.poll_seconds)
        log.info("%s: the capture holds %d rows", job.name, rows)

    async def _distill(
        self, job: Job, spec: DistillJob, directory: Path, capture: str | None, version: str
    ) -> Path:
        async with self._stage(job, "train"):
            if capture is None:
                raise JobFailed("train", "the request has no data.capture.dir (turn on the "
                                "gateway's shadow.capture)")  # fmt: skip
            out = directory / "student"
            argv = [
                self._python, "-m", "kdgate.service.cli", "distill", "--out", str(out),
                "--teacher-card", str(spec.teacher_card), "--capture", capture,
                "--capture-mix", "train", "--student-version", version,
                "--epochs", str(spec.epochs),
                "--cache-dir", str(self._settings.work_dir / "soft-labels"), *spec.extra_args,
            ]  # fmt: skip
            await run_command(
                argv,
                env=child_env({}),
                cwd=directory,
                log_path=directory / "train.log",
                deadline_seconds=spec.deadline_seconds,
            )
        return card_path(spec, directory, version)

    async def _command(
        self, job: Job, spec: CommandJob, directory: Path, capture: str | None, version: str
    ) -> Path:
        out = directory / "out"
        async with self._stage(job, "train"):
            await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
            env = {
                "KDGATE_CAPTURE_DIR": capture or "",
                "KDGATE_REQUEST": str(directory / "request.json"),
                "KDGATE_OUT": str(out),
                "KDGATE_MODEL": job.model,
                "KDGATE_VERSION": version,
            }
            await run_command(
                spec.command,
                env=child_env(env),
                cwd=spec.cwd or directory,
                log_path=directory / "command.log",
                deadline_seconds=spec.deadline_seconds,
            )
            if not (out / STUDENT_FILE).is_file():
                raise JobFailed("train", f"the command wrote no $KDGATE_OUT/{STUDENT_FILE}")
        async with self._stage(job, "import"):
            request = ImportRequest(
                teacher=spec.teacher,
                student=out / STUDENT_FILE,
                name=job.model,
                out=directory / "card",
                sample=spec.sample,
                input_map=spec.input_map,
                scores_output=spec.scores_output,
                output_kind=spec.output_kind,
                class_labels=spec.class_labels,
            )
            imported = await asyncio.to_thread(import_pair, request)
            agreement = imported.student_card.metrics.agreement
            if spec.min_agreement is not None and (
                agreement is None or agreement < spec.min_agreement
            ):
                raise JobFailed(
                    "import",
                    f"agreement with the teacher on the sample {agreement} is below "
                    f"min_agreement {spec.min_agreement}",
                )
        return card_path(spec, directory, version)

    async def _remove(self, job: Job, version: str) -> str:
        """Remove `version` if the gateway holds this job's student under it (never another
        student that took the number meanwhile); returns what happened, for the job's error."""
        spec = self._settings.models.get(job.model)
        directory = self._settings.work_dir / "jobs" / job.name
        card = None if spec is None else card_path(spec, directory, version)
        try:
            ours = await asyncio.to_thread(_card_sha256, card)
            loaded = await self._gateway.versions(job.model)
            if version not in loaded:
                outcome = "not loaded"
            elif ours is None or loaded[version] != ours:
                outcome = "left alone: the gateway holds another student under it"
            else:
                await self._gateway.remove(job.model, version)
                outcome = "removed again"
        except GatewayError as exc:
            outcome = f"NOT removed ({exc}): remove it by hand"
        level = logging.ERROR if outcome.startswith("NOT") else logging.WARNING
        log.log(level, "%s: version %s of %s %s", job.name, version, job.model, outcome)
        if not outcome.startswith("NOT"):
            with contextlib.suppress(Exception):  # the row is informative only here
                await asyncio.to_thread(self._queue.set_registered, job.seq, None)
        return outcome

    @contextlib.asynccontextmanager
    async def _stage(self, job: Job, stage: str) -> AsyncIterator[None]:
        """Record, log and time a stage; its expected failures become JobFailed(stage)."""
        await asyncio.to_thread(self._queue.set_stage, job.seq, stage)
        log.info("%s (model %s): %s", job.name, job.model, stage)
        started = time.monotonic()
        try:
            yield
        except (CommandFailed, GatewayError, IncomparablePair, OSError) as exc:
            raise JobFailed(stage, str(exc)) from None
        self._metrics.stage_seconds.labels(stage=stage).observe(time.monotonic() - started)


def _card_sha256(card: Path | None) -> str | None:
    """The sha256 a student card names (None: no readable card)."""
    try:
        return None if card is None else load_card(card).sha256
    except (OSError, ValueError):
        return None


def _write_request(directory: Path, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "request.json").write_text(body)


def capture_rows(capture: Path) -> int:
    """Rows in a capture directory's finished segments (from their names); 0 while none."""
    with contextlib.suppress(OSError):
        return sum(rows_in_segment(p) for p in capture.iterdir())
    return 0


def _capture_dir(request: Mapping[str, Any]) -> str | None:
    data = request.get("data")
    capture = data.get("capture") if isinstance(data, dict) else None
    found = capture.get("dir") if isinstance(capture, dict) else None
    return found if isinstance(found, str) and found else None
