"""Everything that watches the served models, for one app: built in `create_app`, run in its
lifespan.

    runtime = MonitoringRuntime(settings, state, metrics, window=window, tracer=tracer)
    RequestLog(consumers=[request_metrics, runtime])   # the runtime consumes answered requests
    await runtime.start()    # lifespan start, after the students loaded
    await runtime.stop()     # lifespan end

Per model, `start` builds:
    FidelityRecorder (counters + the recent window), FeedbackStore         (every model)
    teacher (local ONNX thread | remote OIP over httpx), CircuitBreaker,
    ShadowQueue, CaptureStore, ShadowWorker, ModelShadow,
    RolloutEvidence (idle until a rollout watches it)        (models with a comparable teacher)
    DriftFeatures, Reference, InputBuffer, DriftJob and the drift tap      (while drift is on)
and once: the SLO `Monitor` (reads the same `RecentWindow` as `GET /v1/fidelity`), the outbox
(opened at start when `webhook.url` is set, else at the first Alertmanager hook call) and the
notifier (while `webhook.url` is set).

Whether a student and its teacher can be compared, and through which outputs, names and kinds,
is `service.pairing`'s answer; a pair that cannot be is served with comparison off
(`kdgate_comparison_enabled{model} 0` and one warning). A regression model keeps only its
latency and drift objectives.

`consume` is the runtime's side of the request log, on the event loop: per model, successful
requests go to the drift tap (their feature rows: into the reference while it collects, then into
the drift buffer) and the predictions to `ModelShadow.observe_many`.

Drift (docs/slo.md#drift): what is compared follows the student's signature
(`drift_features`: a table's columns; for any other model the predicted class and confidence,
optionally a random projection of the inputs), against the reference file beside the first
student's card when it exists and fits, else the first `drift.reference_rows` rows served. Runs
every `drift.every_seconds` in a child process (`drift.executor: process`, so Evidently never
holds the event loop's GIL) or a thread. The child process starts at the first drift run, never
while drift is off, a reference is still collecting or fewer than `drift.min_rows` rows arrived.

Objectives come from the config and each model's student cards (`objectives_for`); with several
student versions the loosest objective of their cards is kept, so no version pages on clean data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
import numpy as np

from kdgate.monitoring.breaker import CircuitBreaker
from kdgate.monitoring.capture import CaptureStore
from kdgate.monitoring.deadline import DeadlineTransport
from kdgate.monitoring.drift import (
    DriftConfig,
    DriftJob,
    InputBuffer,
    Reference,
    load_reference_inputs,
)
from kdgate.monitoring.drift_features import DriftFeatures, InputSpec
from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.fidelity import OutputKind
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.priority import lowest_process_priority
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.recorder import FidelityRecorder
from kdgate.monitoring.rollout_evidence import RolloutEvidence
from kdgate.monitoring.shadow import ShadowQueue, ShadowWorker
from kdgate.monitoring.slo import Breach, Objective, objectives_for
from kdgate.monitoring.slo_monitor import Monitor
from kdgate.monitoring.teacher import LocalOnnxTeacher, RemoteOipTeacher, Teacher
from kdgate.monitoring.webhook import Notifier, retrain_payload
from kdgate.service.cards import ModelCard, load_card, scores_output, verify_model_file
from kdgate.service.datatypes import NUMPY_DTYPES
from kdgate.service.leader import ALWAYS_LEADER, HostLeader
from kdgate.service.pairing import Pairing, pair_cards, pair_remote
from kdgate.service.request_log import Served
from kdgate.service.runtime import onnx_session_config
from kdgate.service.settings import ModelSettings, Settings, TeacherSettings
from kdgate.service.shadow_tap import ModelShadow
from kdgate.service.state import ServingState
from kdgate.service.tracer import NO_TRACER, Tracer

log = logging.getLogger(__name__)

LINKS = {"slo": "/v1/slo", "drift_report": "/v1/reports/drift"}
Arrays = Mapping[str, np.ndarray[Any, Any]]
InputTap = Callable[[Sequence[Served]], None]
Run = Callable[[dict[str, np.ndarray[Any, Any]]], Arrays]  # a student session's `run`
_MODEL = attrgetter("model")
_INPUTS = attrgetter("inputs")
_OUTPUTS = attrgetter("outputs")
_REQUEST_ID = attrgetter("request_id")
_VERSION = attrgetter("variant.version")
_TRACE = attrgetter("trace")
# Rows of the reference file the student scores at once (prediction features at start).
REFERENCE_CHUNK_ROWS = 256
P = ParamSpec("P")
T = TypeVar("T")


def loosest(per_card: Sequence[Sequence[Objective]]) -> list[Objective]:
    """Per SLO, the most lenient objective among several cards' objectives (same SLO order)."""
    chosen = []
    for candidates in zip(*per_card, strict=True):
        if candidates[0].kind == "min":
            chosen.append(min(candidates, key=lambda o: o.objective))
        else:
            chosen.append(max(candidates, key=lambda o: o.objective))
    return chosen


# Objectives that need class scores: a regression model has no agreement, KL or calibration.
CLASSIFICATION_SLOS = frozenset({"agreement", "kl_mean", "ece_teacher", "ece_label"})


def model_objectives(settings: Settings) -> dict[str, list[Objective]]:
    """Each model's objectives from the config and its student cards (reads the cards); a model
    whose students output regression values keeps only latency and drift."""
    objectives = {}
    for model in settings.models:
        # A weight-0 version whose card is gone is not loaded (service/state.py).
        cards = [load_card(s.card) for s in model.students if s.card.is_file()]
        chosen = loosest([objectives_for(c.metrics, settings.slo, model.name) for c in cards])
        if any(c.output_kind == "regression" for c in cards):
            chosen = [o for o in chosen if o.slo not in CLASSIFICATION_SLOS]
        objectives[model.name] = chosen
    return objectives


@dataclass(frozen=True)
class _Versions:
    student: str | None
    teacher: str | None


def _versions(model: ModelSettings) -> _Versions:
    """The student version most traffic goes to, and the local teacher's card version."""
    weights = model.traffic.weights
    student = max(weights, key=lambda v: weights[v]) if weights else model.students[0].version
    teacher = None
    if model.teacher is not None and model.teacher.card is not None:
        teacher = load_card(model.teacher.card).version
    elif model.teacher is not None:
        teacher = model.teacher.model
    return _Versions(student, teacher)


def reference_path(model: ModelSettings, reference_file: str) -> Path:
    """The drift reference of `model`: absolute, or beside its first student's card."""
    path = Path(reference_file)
    return path if path.is_absolute() else model.students[0].card.parent / path


def drift_features(card: ModelCard, config: DriftConfig) -> DriftFeatures:
    """What drift compares for a student with this card (monitoring/drift_features.py): a
    table's columns, else its predictions from the scores output (when it has one of rank 1 or
    2) and, with `drift.projection`, projected inputs."""
    scores = scores_output(card)
    spec = next((t for t in card.outputs if t.name == scores), None)
    score_columns = 0
    if spec is None or len(spec.shape) not in (1, 2):
        scores = None  # e.g. per-token scores [N, L, C]: no one prediction per row
    elif len(spec.shape) == 1:
        score_columns = 1
    else:
        score_columns = max(spec.shape[1], 0)
    return DriftFeatures.for_signature(
        [InputSpec(t.name, t.datatype, t.shape) for t in card.inputs],
        scores=scores,
        output_kind=card.output_kind,
        score_columns=score_columns,
        predictions=config.predictions,
        projection=config.projection,
        seed=config.projection_seed,
    )


def input_tap(
    model: str, features: DriftFeatures, reference: Reference, buffer: InputBuffer
) -> InputTap:
    """Of each settled batch of one model's answered requests (oldest first), the drift feature
    rows: into `reference` while it collects, the rest into `buffer` (so the two never share a
    row). Requests that do not fit the signature are skipped."""

    def tap(requests: Sequence[Served]) -> None:
        try:
            block = features.rows(list(map(_INPUTS, requests)), list(map(_OUTPUTS, requests)))
        except Exception:  # a bug here must not cost the same batch its shadow and feedback
            log.exception("drift rows of %s not made for %d requests", model, len(requests))
            return
        if block is None:
            return
        was_ready = reference.ready
        rest = reference.take(block)
        if not was_ready and reference.ready:
            log.info("drift reference of %s complete: %s", model, reference.describe())
        if rest is not None:
            buffer.append(rest)

    return tap


def reference_features(
    card: ModelCard, arrays: Arrays, features: DriftFeatures, run: Run
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The feature rows of a reference sample's inputs (blocking): `run` (the student) scores
    them in chunks when predictions are compared. Raises ValueError when they do not fit."""
    rows = len(next(iter(arrays.values())))
    blocks = []
    for start in range(0, rows, REFERENCE_CHUNK_ROWS):
        chunk = {
            t.name: np.asarray(
                arrays[t.name][start : start + REFERENCE_CHUNK_ROWS], NUMPY_DTYPES[t.datatype]
            )
            for t in card.inputs
        }
        outputs = run(chunk) if features.scores is not None else None
        block = features.rows([chunk], [outputs])
        if block is None:
            raise ValueError(f"its arrays do not fit the student's inputs {card.inputs}")
        blocks.append(block)
    return np.concatenate(blocks)


# How long `stop` waits for its background tasks (monitor, drift jobs, notifier) in all.
STOP_TASKS_SECONDS = 30.0

# Drift runs one child process serves before a fresh one replaces it (about an hour at the
# default cadence of one run a minute).
DRIFT_RUNS_PER_CHILD = 60


class LazyProcessPool(Executor):
    """A one-process pool started at the first `submit`, not before (the drift child process).

    spawn, not fork: the parent runs threads (onnxruntime, uvicorn) that fork would copy in
    whatever state they are in. The child runs at the lowest CPU priority: on a core it shares
    with the gateway, requests come first. It is replaced after `runs_per_child` drift runs:
    pandas and Evidently leave a long-lived process holding more memory run after run (soak
    here: the child grew from ~320 to ~340 MiB in 40 runs), and a fresh one starts from its
    baseline at the cost of one start-up (~2 s of low-priority CPU) an hour.
    """

    def __init__(self, runs_per_child: int = DRIFT_RUNS_PER_CHILD) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.runs_per_child = runs_per_child

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=lowest_process_priority,
                    max_tasks_per_child=self.runs_per_child,
                )
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait, cancel_futures=cancel_futures)
                self._pool = None


@dataclass
class ModelMonitoring:
    """Everything kept for one model while the app runs."""

    name: str
    recorder: FidelityRecorder
    feedback: FeedbackStore
    shadow: ModelShadow
    teacher: Teacher | None = None
    breaker: CircuitBreaker | None = None
    capture: CaptureStore | None = None
    worker: ShadowWorker | None = None
    tap: InputTap | None = None
    evidence: RolloutEvidence | None = None


class ServedVersions:
    """The loaded versions of one model, for rollout evidence: whatever router serves now."""

    def __init__(self, state: ServingState, model: str, scores_name: str) -> None:
        self.state = state
        self.model = model
        self.scores_name = scores_name

    def scores(self, version: str, inputs: Arrays) -> np.ndarray[Any, Any]:
        """`version`'s scores output on `inputs` (blocking: an onnxruntime run)."""
        session = self.state.routers[self.model].variants[version].session
        return session.run(dict(inputs))[self.scores_name]

    def kind(self, version: str) -> OutputKind:
        return self.state.routers[self.model].variants[version].session.card.output_kind


class MonitoringRuntime:
    """Shadow workers, feedback stores, the SLO monitor, drift jobs, outbox and notifier.

    `window` is the app's one recent window (also fed by the request metrics); `tracer` traces
    the shadow comparisons and remote teacher calls; `client` (tests inject one) is the
    notifier's HTTP client, a fresh one otherwise. `leader` says whether this process runs the
    once-per-host duties (drift jobs, notifier, retrain requests; service/leader.py): with
    several workers only the one holding the host's lock does, the others wait to take over.
    """

    any_thread = False  # consume() touches event-loop objects (queues, feedback stores)

    def __init__(
        self,
        settings: Settings,
        state: ServingState,
        metrics: Metrics,
        *,
        window: RecentWindow,
        tracer: Tracer = NO_TRACER,
        client: httpx.AsyncClient | None = None,
        leader: HostLeader = ALWAYS_LEADER,
    ) -> None:
        self.settings = settings
        self.leader = leader
        self.state = state
        self.metrics = metrics
        self.window = window
        self.tracer = tracer
        self.models: dict[str, ModelMonitoring] = {}
        self.monitor: Monitor | None = None
        self.outbox: Outbox | None = None
        self.notifier: Notifier | None = None
        self.drift_jobs: dict[str, DriftJob] = {}
        self._hook_notifier: Notifier | None = None  # a non-leader's, for the hook only
        self.buffers: dict[str, InputBuffer] = {}  # model -> recent feature rows for drift
        self.drift_off: dict[str, str] = {}  # model -> why it has no drift job
        self._taps: dict[str, InputTap] = {}
        self.drift_pool: LazyProcessPool | None = None
        self._client = client
        self._own_client = client is None
        self._teacher_client: httpx.Client | None = None
        self._versions: dict[str, _Versions] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._notifier_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_lock = threading.Lock()

    # -- the request log's consumer ------------------------------------------------------------

    def consume(self, rows: Sequence[Served]) -> None:
        """Successful requests of a settled batch -> drift buffers, shadow and feedback."""
        models = self.models
        ok = [row for row in rows if row.outputs is not None]  # outputs: a 200 from a variant
        names = set(map(_MODEL, ok))
        if len(names) == 1:  # the usual batch: one model
            by_model = {names.pop(): ok}
        else:
            by_model = {}
            for row in ok:
                by_model.setdefault(row.model, []).append(row)
        for name, answered in by_model.items():
            monitoring = models.get(name)
            if monitoring is None:
                continue
            if monitoring.tap is not None:
                monitoring.tap(answered)
            # A row with outputs always has its variant: a variant answered it.
            monitoring.shadow.observe_many(
                list(map(_REQUEST_ID, answered)),
                list(map(_VERSION, answered)),
                list(map(_INPUTS, answered)),
                list(map(_OUTPUTS, answered)),
                list(map(_TRACE, answered)),
            )

    # -- lifespan ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build everything (files read in a thread) and start the background tasks."""
        self._loop = asyncio.get_running_loop()
        try:
            objectives = await asyncio.to_thread(self._prepare)
            for model in self.settings.models:
                self.models[model.name] = await self._start_model(model)
        except BaseException:
            await self.stop()
            raise
        self.monitor = Monitor(
            objectives,
            self.settings.slo,
            self.metrics,
            self.window,
            on_breach=self._on_breach if self._monitor_requests_retrains else None,
        )
        self._tasks.append(asyncio.create_task(self.monitor.run(self._stop)))
        if self.leader.try_acquire():
            self._lead()
        else:
            log.info("drift jobs and webhook sender start if this worker becomes the leader")
            self._tasks.append(asyncio.create_task(self._await_leadership()))
        log.info(
            "SLO monitor on for %s (retrain requests from %s); drift for %s; webhook %s",
            sorted(objectives),
            "this monitor"
            if self.settings.slo.evaluator == "local"
            else "Alertmanager only (slo.evaluator: fleet)",
            sorted(self.drift_jobs),
            "on" if self.notifier else "off (webhook.url is null or another worker leads)",
        )

    def _lead(self) -> None:
        """Start the once-per-host duties: the drift jobs and the notifier."""
        for job in self.drift_jobs.values():
            self._tasks.append(asyncio.create_task(job.run(self._stop)))
        if self.outbox is not None and self.settings.webhook.url is not None:
            if self._client is None:
                self._client = httpx.AsyncClient()
            self.notifier = Notifier(self.outbox, self._client, self.settings.webhook, self.metrics)
            self._notifier_task = asyncio.create_task(self.notifier.run())

    async def _await_leadership(self) -> None:
        # Only the leader's death frees the lock, so a worker that takes it keeps it.
        if await self.leader.wait(self._stop) and not self._stop.is_set():
            self._lead()

    async def stop(self) -> None:
        """Stop taking samples, drain the workers, stop the tasks; close what was opened."""
        self._stop.set()
        if self._notifier_task is not None:
            # An entry being delivered stays leased in the outbox and is retried after a restart.
            self._notifier_task.cancel()
            self._tasks.append(self._notifier_task)
        if self._tasks:
            # Bounded: a task that ignores its stop (a bug, a drift run stuck in the child) is
            # named in the log and left behind rather than holding the shutdown for good.
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TASKS_SECONDS)
            for task in stuck:
                log.error("%s did not stop within %g s; abandoned", task, STOP_TASKS_SECONDS)
                task.cancel()
        self._tasks.clear()
        if self.drift_pool is not None:
            await asyncio.to_thread(self.drift_pool.shutdown, True, cancel_futures=True)
        grace = self.settings.shadow.stop_grace_seconds
        models, self.models = self.models, {}  # consume() ignores every model from now on
        for monitoring in models.values():
            if monitoring.worker is not None:
                await monitoring.worker.stop(grace)
            if monitoring.capture is not None:
                await monitoring.capture.aclose()
            if monitoring.teacher is not None:
                await monitoring.teacher.aclose()
        if self._teacher_client is not None:
            self._teacher_client.close()  # the teachers' threads, its only users, have stopped
            self._teacher_client = None
        if self._client is not None and self._own_client:
            await self._client.aclose()
        self.leader.release()

    def model(self, name: str) -> ModelMonitoring | None:
        """The running monitoring of `name`, or None before start / for an unknown model."""
        return self.models.get(name)

    async def captures(self) -> dict[str, dict[str, Any]]:
        """Where each capturing model's rows are (`data.capture` of a retrain request); a
        capture that cannot be listed is left out, with a warning."""
        found = {}
        for name, monitoring in self.models.items():
            if monitoring.capture is None:
                continue
            try:
                found[name] = await asyncio.to_thread(monitoring.capture.describe)
            except OSError as exc:
                log.warning("capture of %s cannot be listed: %s", name, exc)
        return found

    # -- outbox and notifier -------------------------------------------------------------------

    def hook_outbox(self) -> Outbox:
        """The outbox for the Alertmanager hook, opened at its first use (blocking).

        Without `webhook.url` the file is only created once an alert arrives; its requests wait
        there until a URL is configured.
        """
        with self._open_lock:
            if self.outbox is None:
                self.outbox = Outbox(self.settings.webhook.outbox_path)
            return self.outbox

    def hook_notifier(self) -> Notifier | None:
        """The notifier the Alertmanager hook delivers through (`hook_ack: delivered`), on any
        worker: the leader's running one, else one that only delivers on demand. Deliveries are
        leased in the shared outbox (`Outbox.claim`), so two workers never send one entry at
        once; None while the outbox is not open or `webhook.url` is unset."""
        if self.notifier is not None:
            return self.notifier
        if self.outbox is None or self.settings.webhook.url is None:
            return None
        if self._hook_notifier is None:
            if self._client is None:
                self._client = httpx.AsyncClient()
            self._hook_notifier = Notifier(
                self.outbox, self._client, self.settings.webhook, self.metrics
            )
        return self._hook_notifier

    def wake_notifier(self) -> None:
        """Deliver now (callable from any thread)."""
        if self.notifier is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.notifier.wake)

    @property
    def _monitor_requests_retrains(self) -> bool:
        # In a fleet every replica's monitor sees the same incident: Prometheus rules over all
        # replicas ask once, through Alertmanager and the hook, so the monitors only evaluate.
        return self.settings.webhook.url is not None and self.settings.slo.evaluator == "local"

    def _on_breach(self, model: str, breach: Breach) -> None:
        """Monitor callback (worker thread): the breach into the outbox (one request per
        incident: it may join the model's open one), then wake the notifier."""
        assert self.outbox is not None
        if not self.leader.held:
            # Every worker's monitor evaluates and exports its own share of the traffic; one
            # per host asks for retrains, so an incident seen by two workers asks once.
            log.info("SLO %s of %s breached on this worker; the leader asks", breach["slo"], model)
            return
        versions = self._versions[model]
        monitoring = self.models.get(model)
        capture = monitoring.capture if monitoring is not None else None
        payload = retrain_payload(
            model,
            [breach],
            student_version=versions.student,
            teacher_version=versions.teacher,
            links=LINKS,
            capture=capture.describe() if capture is not None else None,
        )
        webhook = self.settings.webhook
        queued = self.outbox.enqueue_breach(
            model,
            breach["slo"],
            payload,
            cooldown_seconds=webhook.cooldown_seconds,
            group_wait_seconds=webhook.group_wait_seconds,
        )
        slo = breach["slo"]
        if queued is None:
            log.info("SLO %s of %s breached again within the cooldown: not re-sent", slo, model)
            return
        if queued.joined:
            log.warning(
                "SLO %s of %s breached: added to the open retrain request %s",
                slo,
                model,
                queued.entry_id,
            )
            return
        log.warning(
            "SLO %s of %s breached: retrain request %s queued%s, sent in %.0f s",
            slo,
            model,
            queued.entry_id,
            "" if queued.follows is None else f" (follows {queued.follows})",
            webhook.group_wait_seconds,
        )
        self.wake_notifier()

    # -- building ------------------------------------------------------------------------------

    def _prepare(self) -> dict[str, list[Objective]]:
        """Blocking part of `start`: cards, references, the outbox file."""
        objectives = model_objectives(self.settings)
        self._versions = {m.name: _versions(m) for m in self.settings.models}
        if self.settings.webhook.url is not None:
            self.outbox = Outbox(self.settings.webhook.outbox_path)
        if self.settings.drift.enabled:
            for model in self.settings.models:
                self._prepare_drift(model)
        return objectives

    def _prepare_drift(self, model: ModelSettings) -> None:
        """The drift job, buffer and tap of `model` (blocking: reads and scores the reference)."""
        drift = self.settings.drift
        session = self.state.routers[model.name].default.session
        features = drift_features(session.card, drift)
        if not features.columns:
            reason = (
                "its student has no scores output to take predictions from, and drift.projection "
                "is 0"
                if drift.predictions != "never"
                else "drift.predictions is never and drift.projection is 0"
            )
            self.drift_off[model.name] = reason
            log.warning("drift is off for %s: %s", model.name, reason)
            return
        reference = self._file_reference(model, session.card, features, session.run)
        if reference is None:
            identity = json.dumps(
                {
                    "student": session.card.sha256,
                    "columns": features.columns,
                    "projection_seed": drift.projection_seed,
                }
            )
            keep = self.settings.admin.state_dir / "drift" / f"{model.name}.reference.npz"
            reference = Reference.served(drift.reference_rows, keep=keep, identity=identity)
        if drift.executor == "process" and self.drift_pool is None:
            self.drift_pool = LazyProcessPool()
        buffer = self.buffers[model.name] = InputBuffer(drift.window_rows, len(features.columns))
        self.drift_jobs[model.name] = DriftJob(
            model.name,
            buffer,
            reference,
            drift,
            self.metrics,
            features=features,
            on_result=self.window.set_drift,
            executor=self.drift_pool,
        )
        self._taps[model.name] = input_tap(model.name, features, reference, buffer)
        log.info(
            "drift for %s compares %s against the reference: %s",
            model.name,
            features.describe(),
            reference.describe(),
        )

    def _file_reference(
        self,
        model: ModelSettings,
        card: ModelCard,
        features: DriftFeatures,
        run: Run,
    ) -> Reference | None:
        """The reference file's rows, or None (logged) when there is none or it does not fit."""
        drift = self.settings.drift
        path = reference_path(model, drift.reference_file)
        if not path.is_file():
            log.info("no drift reference file for %s at %s", model.name, path)
            return None
        try:
            arrays = load_reference_inputs(path, [t.name for t in card.inputs], drift.reference_key)
            rows = reference_features(card, arrays, features, run)
        except Exception as exc:
            # Any unusable file (not an npz, missing arrays, shapes, the student's error on its
            # arrays) leaves the model with the served reference rather than without drift.
            log.warning(
                "drift reference %s of %s is not usable (%s): the first %d served rows are the "
                "reference instead",
                path,
                model.name,
                exc,
                drift.reference_rows,
            )
            return None
        return Reference(rows, source=f"file {path}")

    def drift_status(self) -> list[dict[str, Any]]:
        """Per model: its drift job's status (`DriftJob.status`), or status "off" and why."""
        statuses = []
        for model in self.settings.models:
            job = self.drift_jobs.get(model.name)
            if job is not None:
                statuses.append(job.status())
                continue
            reason = self.drift_off.get(model.name, "drift.enabled is false")
            statuses.append({"model": model.name, "status": "off", "reason": reason})
        return statuses

    async def _start_model(self, model: ModelSettings) -> ModelMonitoring:
        settings = self.settings
        router = self.state.routers[model.name]
        card = router.default.session.card
        pairing, teacher_card = await asyncio.to_thread(_pairing, model, card)
        enabled = self.metrics.comparison_enabled.labels(model.name)
        enabled.set(0)
        if model.teacher is not None and not pairing.comparable:
            log.warning(
                "%s: comparison with the teacher is off (the student serves): %s",
                model.name,
                pairing.reason,
            )
        kinds = (pairing.student_kind, pairing.teacher_kind)
        if not pairing.comparable:  # only the student's own labels are recorded
            kinds = (card.output_kind, card.output_kind)
        recorder = FidelityRecorder(
            self.metrics,
            model.name,
            window=self.window,
            student_kind=kinds[0],
            teacher_kind=kinds[1],
        )
        for version in router.variants:
            recorder.bind(version)
        evidence = None
        if model.teacher is not None and pairing.comparable:
            assert pairing.student_scores is not None  # a comparable pairing names both outputs
            versions = ServedVersions(self.state, model.name, pairing.student_scores)
            evidence = RolloutEvidence(model.name, versions, teacher_kind=pairing.teacher_kind)
        feedback = FeedbackStore(
            recorder,
            max_size=settings.feedback.max_size,
            ttl_seconds=settings.feedback.ttl_seconds,
            class_labels=card.class_labels,
            on_labels=None if evidence is None else evidence.attach_labels,
        )
        tap = self._taps.get(model.name)
        if evidence is None or model.teacher is None:
            shadow = ModelShadow(
                feedback, None, shadow_fraction=lambda: 0.0, scores_name=pairing.student_scores
            )
            return ModelMonitoring(model.name, recorder, feedback, shadow, tap=tap)
        teacher = await self._teacher(model.name, model.teacher, card, pairing, teacher_card)
        enabled.set(1)
        breaker = CircuitBreaker(
            failure_threshold=model.teacher.breaker.failure_threshold,
            cooldown_seconds=model.teacher.breaker.cooldown_seconds,
        )
        # Read at scrape time: the breaker changes state on the teacher thread's schedule.
        self.metrics.teacher_breaker_state.labels(model.name).set_function(
            lambda: BREAKER_STATE_VALUES[breaker.state]
        )
        queue = ShadowQueue(self.metrics, model.name, capacity_rows=settings.shadow.queue_size)
        capture = None
        options = settings.shadow.capture
        if options.dir is not None:
            capture = CaptureStore(
                options.dir / model.name,
                teacher_kind=pairing.teacher_kind,
                segment_rows=options.segment_rows,
                max_rows=options.max_rows,
                flush_seconds=options.flush_seconds,
            )
        worker = ShadowWorker(
            queue,
            teacher,
            recorder,
            breaker=breaker,
            capture=capture,
            feedback=feedback,
            evidence=evidence,
            max_batch=model.teacher.max_batch or settings.shadow.max_batch,
            teacher_timeout_seconds=model.teacher.timeout_seconds,
            linger_seconds=settings.shadow.linger_seconds,
            trace=self.tracer.compare(model.name, teacher.name),
        )
        shadow = ModelShadow(
            feedback,
            queue,
            shadow_fraction=partial(_shadow_fraction, self.state, model.name),
            scores_name=pairing.student_scores,
        )
        worker.start()
        return ModelMonitoring(
            model.name, recorder, feedback, shadow, teacher, breaker, capture, worker, tap, evidence
        )

    async def _teacher(
        self,
        model: str,
        teacher: TeacherSettings,
        student: ModelCard,
        pairing: Pairing,
        teacher_card: ModelCard | None,
    ) -> Teacher:
        assert pairing.teacher_scores is not None  # a comparable pairing names both outputs
        if teacher.card is not None:
            assert teacher_card is not None
            return await asyncio.to_thread(
                _local_teacher, teacher, teacher_card, pairing.teacher_scores, pairing.input_map
            )
        assert teacher.url is not None and teacher.model is not None  # the settings ensure it
        return RemoteOipTeacher(
            self._http_client(),
            url=teacher.url,
            model=teacher.model,
            version=teacher.model_version or "remote",
            model_version=teacher.model_version,
            output_name=pairing.teacher_scores,
            input_datatypes={t.name: t.datatype for t in student.inputs},
            input_map=pairing.input_map,
            timeout_seconds=teacher.timeout_seconds,
        )

    def _http_client(self) -> httpx.Client:
        if self._teacher_client is None:
            # No environment proxies: the teacher is a known endpoint, not general egress.
            # Synchronous: each remote teacher calls it from its own worker thread. The deadline
            # transport makes the teacher's timeout a total per call, not a per-read one.
            self._teacher_client = httpx.Client(
                transport=DeadlineTransport(),
                trust_env=False,
                event_hooks=dict(self.tracer.http_hooks()),
            )
        return self._teacher_client


# kdgate_teacher_breaker_state: ordered by how much of the teacher traffic is refused.
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def _shadow_fraction(state: ServingState, model: str) -> float:
    """The fraction of `model`'s current router (config, restored state or admin API)."""
    return state.routers[model].shadow_fraction


def _pairing(model: ModelSettings, student: ModelCard) -> tuple[Pairing, ModelCard | None]:
    """How `model`'s student is compared with its teacher, and the local teacher's card
    (blocking: reads it)."""
    teacher = model.teacher
    if teacher is None:
        return pair_remote(student), None
    if teacher.card is None:
        return pair_remote(student, teacher.input_map), None
    card = load_card(teacher.card)
    return pair_cards(student, card, teacher.input_map), card


def _local_teacher(
    teacher: TeacherSettings, card: ModelCard, output_name: str, input_map: Mapping[str, str]
) -> LocalOnnxTeacher:
    """Load a local teacher (blocking), refusing a model file that does not match its card."""
    assert teacher.card is not None
    session = onnx_session_config(
        teacher.providers,
        dict(teacher.provider_options),
        teacher.session_options,
        intra_op_threads=teacher.intra_op_threads,
    )
    return LocalOnnxTeacher(
        verify_model_file(teacher.card, card),
        name=card.name,
        version=card.version,
        output_name=output_name,
        input_map=input_map,
        intra_op_threads=teacher.intra_op_threads,
        session_options=session.options,
        providers=session.providers,
    )
