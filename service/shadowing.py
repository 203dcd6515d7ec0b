"""Shadow traffic, feedback and tracing wired into the app: what the lifespan starts and stops.

    create_app: Shadowing(state, inference)       nothing runs yet
    lifespan start (after the students loaded): per model
        FidelityRecorder + FidelityWindow, FeedbackStore            (every model)
        teacher (local ONNX thread | remote OIP over httpx),         (models with a teacher)
        CircuitBreaker, ShadowQueue, CaptureStore, ShadowWorker
        -> Inference.observers[model] = ModelShadow.observe_many     (the request-path hook)
    lifespan end: observers removed, then per model
        worker.stop -> capture.aclose -> teacher.aclose; then the httpx client and tracing

`ModelShadow.observe_many` is all the request path does for monitoring, in bulk for the requests
of one journal (service/inference.py): remember each prediction for feedback, and for a
deterministic fraction of request ids offer (input, student logits) to the bounded queue without
waiting. Everything else runs in the worker task and the teacher's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from kdgate.monitoring.breaker import CircuitBreaker
from kdgate.monitoring.capture import CaptureStore
from kdgate.monitoring.deadline import DeadlineTransport
from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.fidelity_window import FidelityWindow
from kdgate.monitoring.latency_window import LatencyWindow
from kdgate.monitoring.recorder import FidelityRecorder
from kdgate.monitoring.shadow import ShadowQueue, ShadowSample, ShadowWorker, should_shadow
from kdgate.monitoring.teacher import LocalOnnxTeacher, RemoteOipTeacher, Teacher
from kdgate.service.cards import ModelCard, load_card, verify_model_file
from kdgate.service.inference import Inference, Observation
from kdgate.service.settings import ModelSettings, TeacherSettings
from kdgate.service.state import ServingState

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from kdgate.service.tracing import Tracing

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray[Any, Any]]
# How often the latency window reads the request-duration histogram, seconds.
LATENCY_SAMPLE_SECONDS = 2.0


# kdgate_teacher_breaker_state: ordered by how much of the teacher traffic is refused.
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def _shadow_fraction(state: ServingState, model: str) -> float:
    """The fraction of `model`'s current router (config, restored state or admin API)."""
    return state.routers[model].shadow_fraction


class ModelShadow:
    """The hot-path hook of one model: keep every prediction, shadow a fraction of them.

    `shadow_fraction` returns the model's current fraction: the traffic admin API swaps the
    model's router (and with it the fraction) at run time, so it is read per request (~0.1 us).
    """

    __slots__ = (
        "feedback",
        "input_name",
        "output_name",
        "queue",
        "shadow_fraction",
        "trace_context",
    )

    def __init__(
        self,
        feedback: FeedbackStore,
        queue: ShadowQueue | None,
        *,
        shadow_fraction: Callable[[], float],
        input_name: str,
        output_name: str,
        trace_context: Callable[[], Any] | None = None,
    ) -> None:
        self.feedback = feedback
        self.queue = queue
        self.shadow_fraction = shadow_fraction
        self.input_name = input_name
        self.output_name = output_name
        self.trace_context = trace_context

    @property
    def fraction(self) -> float:
        """The shadow fraction in force now."""
        return self.shadow_fraction() if self.queue is not None else 0.0

    def observe(self, request_id: str, version: str, inputs: Arrays, outputs: Arrays) -> None:
        """One successful prediction; see `observe_many`."""
        self.observe_many([(request_id, version, inputs, outputs)])

    def observe_many(self, predictions: Sequence[Observation]) -> None:
        """Successful predictions, oldest first: never awaits, never raises on a full queue.

        The shadow fraction is read once per call: the predictions of one journal (at most
        ~10 ms of traffic, service/inference.py) share it.
        """
        try:
            queue = self.queue
            fraction = self.shadow_fraction() if queue is not None else 0.0
            kept = []
            for request_id, version, inputs, outputs in predictions:
                logits = outputs[self.output_name]
                shadowed = False
                if fraction and queue is not None and should_shadow(request_id, fraction):
                    trace = self.trace_context() if self.trace_context is not None else None
                    rows = inputs[self.input_name]
                    shadowed = queue.offer(ShadowSample(request_id, version, rows, logits, trace))
                kept.append((request_id, version, logits, shadowed))
            self.feedback.put_many(kept)
        except Exception:  # monitoring must never fail the answer already computed
            log.exception("shadow/feedback hook failed for %d predictions", len(predictions))


@dataclass
class ModelMonitoring:
    """Everything kept for one model while the app runs."""

    name: str
    recorder: FidelityRecorder
    window: FidelityWindow
    feedback: FeedbackStore
    shadow: ModelShadow
    teacher: Teacher | None = None
    breaker: CircuitBreaker | None = None
    capture: CaptureStore | None = None
    worker: ShadowWorker | None = None


class Shadowing:
    """Builds, starts and stops the monitoring of every served model (see the module doc).

    `tracer_provider` (tests) turns tracing on with that provider; otherwise tracing is on only
    when the `OTEL_*` variables of `environ` (default: the process environment) configure it.
    """

    def __init__(
        self,
        state: ServingState,
        inference: Inference,
        *,
        tracer_provider: TracerProvider | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.state = state
        self.inference = inference
        self.models: dict[str, ModelMonitoring] = {}
        self.latency = LatencyWindow(
            state.metrics, window_seconds=state.settings.shadow.window_seconds
        )
        self._tracer_provider = tracer_provider
        self._environ = environ
        self._tracing: Tracing | None = None
        self._client: httpx.Client | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start monitoring every model (call once the students are loaded)."""
        self._tracing = self._start_tracing()
        if self._tracing is not None:
            self._tracing.instrument(self.inference, self.state)
        try:
            for model in self.state.settings.models:
                monitoring = await self._start_model(model)
                self.models[model.name] = monitoring
                self.inference.observers[model.name] = monitoring.shadow.observe_many
        except BaseException:
            await self.stop()
            raise
        self._sampler = asyncio.create_task(self._sample_latency(), name="kdgate-latency")

    async def stop(self) -> None:
        """Stop taking samples, drain the workers, then close captures, teachers, clients."""
        self.inference.observers.clear()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        grace = self.state.settings.shadow.stop_grace_seconds
        for monitoring in self.models.values():
            if monitoring.worker is not None:
                await monitoring.worker.stop(grace)
            if monitoring.capture is not None:
                await monitoring.capture.aclose()
            if monitoring.teacher is not None:
                await monitoring.teacher.aclose()
        if self._client is not None:
            self._client.close()  # the teachers' threads, its only users, have stopped
            self._client = None
        if self._tracing is not None:
            await self._tracing.aclose()
            self._tracing = None

    def model(self, name: str) -> ModelMonitoring | None:
        """The running monitoring of `name`, or None before start / for an unknown model."""
        return self.models.get(name)

    def _start_tracing(self) -> Tracing | None:
        environ = os.environ if self._environ is None else self._environ
        if self._tracer_provider is None:
            # Import lazily: with tracing off, opentelemetry is never loaded.
            from kdgate.service.tracing import tracing_configured

            if not tracing_configured(environ):
                return None
        from kdgate.service.tracing import Tracing, provider_from_env

        if self._tracer_provider is not None:
            return Tracing(self._tracer_provider, owned=False)
        return Tracing(provider_from_env(environ), owned=True)

    async def _start_model(self, model: ModelSettings) -> ModelMonitoring:
        settings = self.state.settings
        router = self.state.routers[model.name]
        card = router.default.session.card
        window = FidelityWindow(window_seconds=settings.shadow.window_seconds)
        recorder = FidelityRecorder(self.state.metrics, model.name, window=window)
        for version in router.variants:
            recorder.bind(version)
        feedback = FeedbackStore(
            recorder,
            max_size=settings.feedback.max_size,
            ttl_seconds=settings.feedback.ttl_seconds,
            class_labels=card.class_labels,
        )
        input_name, output_name = card.inputs[0].name, card.outputs[0].name
        if model.teacher is None:
            shadow = ModelShadow(
                feedback,
                None,
                shadow_fraction=lambda: 0.0,
                input_name=input_name,
                output_name=output_name,
            )
            return ModelMonitoring(model.name, recorder, window, feedback, shadow)
        teacher = await self._teacher(model.name, model.teacher, card)
        breaker = CircuitBreaker(
            failure_threshold=model.teacher.breaker.failure_threshold,
            cooldown_seconds=model.teacher.breaker.cooldown_seconds,
        )
        # Read at scrape time: the breaker changes state on the teacher thread's schedule.
        self.state.metrics.teacher_breaker_state.labels(model.name).set_function(
            lambda: BREAKER_STATE_VALUES[breaker.state]
        )
        queue = ShadowQueue(
            self.state.metrics, model.name, capacity_rows=settings.shadow.queue_size
        )
        capture = None
        options = settings.shadow.capture
        if options.dir is not None:
            capture = CaptureStore(
                options.dir / model.name,
                segment_rows=options.segment_rows,
                max_rows=options.max_rows,
                flush_seconds=options.flush_seconds,
            )
        tracing = self._tracing
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
            trace=tracing.compare_span(model.name, teacher.name) if tracing else None,
        )
        shadow = ModelShadow(
            feedback,
            queue,
            shadow_fraction=partial(_shadow_fraction, self.state, model.name),
            input_name=input_name,
            output_name=output_name,
            trace_context=tracing.request_context if tracing else None,
        )
        worker.start()
        return ModelMonitoring(
            model.name, recorder, window, feedback, shadow, teacher, breaker, capture, worker
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
        if self._client is None:
            hooks = {"request": [self._tracing.inject_traceparent]} if self._tracing else {}
            # No environment proxies: the teacher is a known endpoint, not general egress.
            # Synchronous: each remote teacher calls it from its own worker thread. The deadline
            # transport makes the teacher's timeout a total per call, not a per-read one.
            self._client = httpx.Client(
                transport=DeadlineTransport(), trust_env=False, event_hooks=hooks
            )
        return self._client

    async def _sample_latency(self) -> None:
        while True:
            self.latency.sample()
            await asyncio.sleep(LATENCY_SAMPLE_SECONDS)


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
    return LocalOnnxTeacher(
        verify_model_file(teacher.card, card),
        name=card.name,
        version=card.version,
        input_name=card.inputs[0].name,
        output_name=card.outputs[0].name,
        intra_op_threads=teacher.intra_op_threads,
    )
