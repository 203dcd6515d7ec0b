"""Everything that watches the served models, for one app: built in `create_app`, run in its
lifespan.

    runtime = MonitoringRuntime(settings, state, metrics, window=window, tracer=tracer)
    RequestLog(consumers=[request_metrics, runtime])   # the runtime consumes answered requests
    await runtime.start()    # lifespan start, after the students loaded
    await runtime.stop()     # lifespan end

Per model, `start` builds:
    FidelityRecorder (counters + the recent window), FeedbackStore         (every model)
    teacher (local ONNX thread | remote OIP over httpx), CircuitBreaker,
    ShadowQueue, CaptureStore, ShadowWorker, ModelShadow                    (models with a teacher)
    InputBuffer + DriftJob                         (drift on and the model has a reference sample)
and once: the SLO `Monitor` (reads the same `RecentWindow` as `GET /v1/fidelity`), the outbox
(opened at start when `webhook.url` is set, else at the first Alertmanager hook call) and the
notifier (while `webhook.url` is set).

`consume` is the runtime's side of the request log, on the event loop: per model, the inputs of
successful requests go to the drift buffer and the predictions to `ModelShadow.observe_many`.

Drift runs every `drift.every_seconds` in a child process (`drift.executor: process`, so Evidently
never holds the event loop's GIL) or a thread. The child process starts at the first drift run,
never while drift is off or no model has a reference sample.

Objectives come from the config and each model's student cards (`objectives_for`); with several
student versions the loosest objective of their cards is kept, so no version pages on clean data.
"""

from __future__ import annotations

import asyncio
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
from kdgate.monitoring.drift import DriftJob, InputBuffer, load_reference
from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.priority import lowest_process_priority
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.recorder import FidelityRecorder
from kdgate.monitoring.shadow import ShadowQueue, ShadowWorker
from kdgate.monitoring.slo import Breach, Objective, objectives_for
from kdgate.monitoring.slo_monitor import Monitor
from kdgate.monitoring.teacher import LocalOnnxTeacher, RemoteOipTeacher, Teacher
from kdgate.monitoring.webhook import Notifier, retrain_payload
from kdgate.service.cards import ModelCard, load_card, verify_model_file
from kdgate.service.request_log import Served
from kdgate.service.runtime import onnx_session_config
from kdgate.service.settings import ModelSettings, Settings, TeacherSettings
from kdgate.service.shadow_tap import ModelShadow, Observation
from kdgate.service.state import ServingState
from kdgate.service.tracer import NO_TRACER, Tracer

log = logging.getLogger(__name__)

LINKS = {"slo": "/v1/slo", "drift_report": "/v1/reports/drift"}
Arrays = Mapping[str, np.ndarray[Any, Any]]
InputTap = Callable[[Sequence[Arrays]], None]
_MODEL = attrgetter("model")
_INPUTS = attrgetter("inputs")
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


def model_objectives(settings: Settings) -> dict[str, list[Objective]]:
    """Each model's objectives from the config and its student cards (reads the cards)."""
    return {
        model.name: loosest(
            [
                objectives_for(load_card(s.card).metrics, settings.slo, model.name)
                for s in model.students
                # A weight-0 version whose card is gone is not loaded (service/state.py).
                if s.card.is_file()
            ]
        )
        for model in settings.models
    }


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


def input_tap(buffer: InputBuffer, width: int) -> InputTap:
    """Of each request (oldest first), the first input, if it is a [n, width] matrix, into
    `buffer`."""

    def tap(requests: Sequence[Arrays]) -> None:
        for inputs in requests:
            for rows in inputs.values():
                if rows.ndim == 2 and rows.shape[1] == width:
                    buffer.append(rows)
                break

    return tap


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


class MonitoringRuntime:
    """Shadow workers, feedback stores, the SLO monitor, drift jobs, outbox and notifier.

    `window` is the app's one recent window (also fed by the request metrics); `tracer` traces
    the shadow comparisons and remote teacher calls; `client` (tests inject one) is the
    notifier's HTTP client, a fresh one otherwise.
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
    ) -> None:
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.window = window
        self.tracer = tracer
        self.models: dict[str, ModelMonitoring] = {}
        self.monitor: Monitor | None = None
        self.outbox: Outbox | None = None
        self.notifier: Notifier | None = None
        self.drift_jobs: dict[str, DriftJob] = {}
        self.buffers: dict[str, InputBuffer] = {}  # model -> recent inputs for the drift job
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
                monitoring.tap(list(map(_INPUTS, answered)))
            observations: list[Observation] = [
                (request_id, variant.version, inputs, outputs, trace)
                for _, _, variant, _, _, request_id, inputs, outputs, trace, _ in answered
                if variant is not None and outputs is not None  # always so with outputs
            ]
            monitoring.shadow.observe_many(observations)

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
        for job in self.drift_jobs.values():
            self._tasks.append(asyncio.create_task(job.run(self._stop)))
        if self.outbox is not None and self.settings.webhook.url is not None:
            if self._client is None:
                self._client = httpx.AsyncClient()
            self.notifier = Notifier(self.outbox, self._client, self.settings.webhook, self.metrics)
            self._notifier_task = asyncio.create_task(self.notifier.run())
        log.info(
            "SLO monitor on for %s (retrain requests from %s); drift for %s; webhook %s",
            sorted(objectives),
            "this monitor"
            if self.settings.slo.evaluator == "local"
            else "Alertmanager only (slo.evaluator: fleet)",
            sorted(self.drift_jobs),
            "on" if self.notifier else "off (webhook.url is null)",
        )

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

    def model(self, name: str) -> ModelMonitoring | None:
        """The running monitoring of `name`, or None before start / for an unknown model."""
        return self.models.get(name)

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
        versions = self._versions[model]
        payload = retrain_payload(
            model,
            [breach],
            student_version=versions.student,
            teacher_version=versions.teacher,
            links=LINKS,
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
        drift = self.settings.drift
        if not drift.enabled:
            return objectives
        for model in self.settings.models:
            path = reference_path(model, drift.reference_file)
            if not path.is_file():
                log.warning("no drift reference for %s at %s: drift is off", model.name, path)
                continue
            if drift.executor == "process" and self.drift_pool is None:
                self.drift_pool = LazyProcessPool()
            reference = load_reference(path, drift.reference_key)
            buffer = self.buffers[model.name] = InputBuffer(drift.window_rows, reference.shape[1])
            self.drift_jobs[model.name] = DriftJob(
                model.name,
                buffer,
                reference,
                drift,
                self.metrics,
                on_result=self.window.set_drift,
                executor=self.drift_pool,
            )
        return objectives

    async def _start_model(self, model: ModelSettings) -> ModelMonitoring:
        settings = self.settings
        router = self.state.routers[model.name]
        card = router.default.session.card
        recorder = FidelityRecorder(self.metrics, model.name, window=self.window)
        for version in router.variants:
            recorder.bind(version)
        feedback = FeedbackStore(
            recorder,
            max_size=settings.feedback.max_size,
            ttl_seconds=settings.feedback.ttl_seconds,
            class_labels=card.class_labels,
        )
        tap = None
        if (buffer := self.buffers.get(model.name)) is not None:
            tap = input_tap(buffer, buffer.width)
        input_name, output_name = card.inputs[0].name, card.outputs[0].name
        if model.teacher is None:
            shadow = ModelShadow(
                feedback,
                None,
                shadow_fraction=lambda: 0.0,
                input_name=input_name,
                output_name=output_name,
            )
            return ModelMonitoring(model.name, recorder, feedback, shadow, tap=tap)
        teacher = await self._teacher(model.name, model.teacher, card)
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
            max_batch=model.teacher.max_batch or settings.shadow.max_batch,
            teacher_timeout_seconds=model.teacher.timeout_seconds,
            linger_seconds=settings.shadow.linger_seconds,
            trace=self.tracer.compare(model.name, teacher.name),
        )
        shadow = ModelShadow(
            feedback,
            queue,
            shadow_fraction=partial(_shadow_fraction, self.state, model.name),
            input_name=input_name,
            output_name=output_name,
        )
        worker.start()
        return ModelMonitoring(
            model.name, recorder, feedback, shadow, teacher, breaker, capture, worker, tap
        )

    async def _teacher(self, model: str, teacher: TeacherSettings, student: ModelCard) -> Teacher:
        if teacher.card is not None:
            return await asyncio.to_thread(_local_teacher, model, teacher, student)
        assert teacher.url is not None and teacher.model is not None  # the settings ensure it
        return RemoteOipTeacher(
            self._http_client(),
            url=teacher.url,
            model=teacher.model,
            version=teacher.model_version or "remote",
            model_version=teacher.model_version,
            input_name=student.inputs[0].name,
            output_name=student.outputs[0].name,
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


def _local_teacher(model: str, teacher: TeacherSettings, student: ModelCard) -> LocalOnnxTeacher:
    """Load a local teacher (blocking), refusing one whose signature differs from the student's."""
    assert teacher.card is not None
    card = load_card(teacher.card)

    def signature(c: ModelCard) -> list[tuple[str, list[int]]]:
        return [(t.datatype, t.shape) for t in c.inputs]

    if signature(card) != signature(student):
        raise ValueError(f"model {model!r}: teacher inputs {card.inputs} differ from the student's")
    if card.class_labels != student.class_labels:
        raise ValueError(f"model {model!r}: teacher and student class labels differ")
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
        input_name=card.inputs[0].name,
        output_name=card.outputs[0].name,
        intra_op_threads=teacher.intra_op_threads,
        session_options=session.options,
        providers=session.providers,
    )
