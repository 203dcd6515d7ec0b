"""The shadow path of one model: sample requests, queue them without waiting, compare in batches.

    hot path (event loop)                       background (asyncio task)
    should_shadow(id, fraction) -> bool
    ShadowQueue.offer(sample) -> bool  ──────►  ShadowWorker: take <= max_batch rows
      O(1), never awaits; when full the            -> breaker -> teacher.infer (thread / HTTP)
      sample is dropped and counted                -> FidelityRecorder (counters, window)
                                                   -> CaptureStore, FeedbackStore.attach_teacher
                                                   -> RolloutEvidence (while a rollout runs)

Units: everything is counted in ROWS (input instances), not requests: queue capacity, queue depth
(`kdgate_shadow_queue_depth`), `max_batch`, and `kdgate_shadow_total{outcome}` — so
`compared` rows equal `kdgate_fidelity_samples_total` summed over versions, and
compared + teacher_error + dropped is every row that was shadowed. A queue and a worker serve one
model (the queue's `model`); a batch may mix student versions.

A sample carries every input of its request by name (any dtype and rank, rows first) and the
student's scores output. The worker concatenates a batch per input name; requests whose inputs
differ beyond the rows (token sequences of another length, say) go to the teacher in separate
calls, one per shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kdgate.monitoring.breaker import CircuitBreaker
from kdgate.monitoring.capture import CaptureStore
from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recorder import FidelityRecorder
from kdgate.monitoring.rollout_evidence import RolloutEvidence
from kdgate.monitoring.teacher import Teacher, TeacherError

log = logging.getLogger(__name__)

_CRC_RANGE = float(2**32)


def should_shadow(request_id: str, fraction: float) -> bool:
    """Whether to shadow this request: the same id always gives the same answer.

    The CRC-32 of the UTF-8 id, scaled to [0, 1), is compared with `fraction` (<= 0: never,
    >= 1: always). About 0.3 us; uniform enough for UUIDs and for sequential ids. It is not a
    secret hash: a caller who picks ids can pick whether they are shadowed.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return zlib.crc32(request_id.encode()) < fraction * _CRC_RANGE


@dataclass(frozen=True, slots=True)
class ShadowSample:
    """One shadowed request: its inputs by name ([rows, ...] each) and the student's scores
    output [rows, ...] (class logits or probabilities [rows, C], or regression values).

    `trace` is opaque to this module (e.g. the request's OpenTelemetry span context, for linking
    the comparison span); it is handed back to the worker's `trace` hook.
    """

    request_id: str
    version: str
    inputs: Mapping[str, NDArray[Any]]
    student_scores: NDArray[Any]
    trace: Any = None

    @property
    def rows(self) -> int:
        """Number of input rows (the scores' leading dimension)."""
        return len(self.student_scores)


class ShadowQueue:
    """Bounded queue of shadow samples, at most `capacity_rows` rows, for one model.

    `offer` is called on the event loop thread (it sets an asyncio.Event), never blocks and
    never awaits.
    """

    def __init__(self, metrics: Metrics, model: str, *, capacity_rows: int = 4096) -> None:
        if capacity_rows < 1:
            raise ValueError("capacity_rows must be at least 1")
        self.model = model
        self.capacity_rows = capacity_rows
        self._samples: deque[ShadowSample] = deque()
        self._rows = 0
        self._ready = asyncio.Event()
        self._dropped = metrics.shadow.labels(model, "dropped")
        self._depth = metrics.shadow_queue_depth.labels(model)
        self._depth.set(0)

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def rows(self) -> int:
        """Rows waiting."""
        return self._rows

    def offer(self, sample: ShadowSample) -> bool:
        """Enqueue `sample` and return True; if it does not fit, count its rows as dropped and
        return False."""
        if self._rows + sample.rows > self.capacity_rows:
            self._dropped.inc(sample.rows)
            return False
        self._samples.append(sample)
        self._rows += sample.rows
        self._depth.set(self._rows)
        self._ready.set()
        return True

    def take(self, max_rows: int) -> list[ShadowSample]:
        """Dequeue the oldest samples, up to `max_rows` rows (but at least one sample)."""
        batch: list[ShadowSample] = []
        taken = 0
        while self._samples and (not batch or taken + self._samples[0].rows <= max_rows):
            sample = self._samples.popleft()
            batch.append(sample)
            taken += sample.rows
        self._rows -= taken
        self._depth.set(self._rows)
        return batch

    async def wait(self) -> None:
        """Return once a sample is waiting or `wake()` was called."""
        if self._samples:
            return
        self._ready.clear()
        await self._ready.wait()

    def wake(self) -> None:
        """Release a pending `wait()` (used to stop the worker)."""
        self._ready.set()


TraceHook = Callable[[Sequence[ShadowSample]], AbstractContextManager[Any]]


class ShadowWorker:
    """Drains `queue` in batches of at most `max_batch` rows through `teacher`.

    Per batch: if the breaker refuses, or the teacher fails or takes longer than
    `teacher_timeout_seconds`, every row counts as `teacher_error`; otherwise the pairs are
    recorded by `recorder` (fidelity counters, and its window), counted as `compared`, appended to
    `capture`, and the teacher's scores attached to `feedback`. The teacher's scores must have the
    shape of the student's (else the rows count as `teacher_error`). `trace(batch)` (optional) wraps
    the comparison of each batch, e.g. in a span linked to the requests' spans. After an idle spell
    the worker waits `linger_seconds` for more rows before taking the first batch (as Triton's
    dynamic batcher does with its queue delay); a busy worker never lingers, since rows
    queue up while the teacher runs. `evidence` (optional) gets every compared batch with the
    teacher's scores: while a rollout is watched it pairs candidate and incumbent on them
    (monitoring/rollout_evidence.py), else it returns at once.

    `start()` launches the task on the running loop; `await stop(grace_seconds)` lets it finish the
    rows already queued and cancels it if that takes longer than `grace_seconds`.
    """

    def __init__(
        self,
        queue: ShadowQueue,
        teacher: Teacher,
        recorder: FidelityRecorder,
        *,
        breaker: CircuitBreaker | None = None,
        capture: CaptureStore | None = None,
        feedback: FeedbackStore | None = None,
        evidence: RolloutEvidence | None = None,
        max_batch: int = 64,
        teacher_timeout_seconds: float | None = None,
        linger_seconds: float = 0.01,
        trace: TraceHook | None = None,
    ) -> None:
        if queue.model != recorder.model:
            raise ValueError(f"queue of {queue.model!r} but recorder of {recorder.model!r}")
        self.queue = queue
        self.teacher = teacher
        self.recorder = recorder
        self.breaker = breaker or CircuitBreaker()
        self.capture = capture
        self.feedback = feedback
        self.evidence = evidence
        self.max_batch = max_batch
        self.teacher_timeout_seconds = teacher_timeout_seconds
        self.linger_seconds = linger_seconds
        self._trace = trace
        self._compared = recorder.metrics.shadow.labels(queue.model, "compared")
        self._errors = recorder.metrics.shadow.labels(queue.model, "teacher_error")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start draining the queue (call from the running event loop)."""
        if self._task is not None:
            raise RuntimeError("shadow worker already started")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"shadow-{self.queue.model}")

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Finish the queued rows, or cancel after `grace_seconds`."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self.queue.wake()
        done, _ = await asyncio.wait({task}, timeout=grace_seconds)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            if not len(self.queue):
                if self._stopping:
                    return
                await self.queue.wait()
                if self.linger_seconds > 0 and not self._stopping:
                    # A batch costs ~80 us of numpy and counter calls before its first row
                    # (measured); waiting a little for more rows amortises that at low rates.
                    await asyncio.sleep(self.linger_seconds)
                continue
            batch = self.queue.take(self.max_batch)
            try:
                await self.process(batch)
            except Exception:  # a bug in one batch must not end shadowing for good
                log.exception("shadow batch of %s failed", self.queue.model)

    async def process(self, batch: Sequence[ShadowSample]) -> None:
        """Compare one batch with the teacher and record the outcome (see the class docstring)."""
        with self._trace(batch) if self._trace else contextlib.nullcontext():
            for group in _same_shapes(batch):
                await self._process(group)

    async def _process(self, batch: Sequence[ShadowSample]) -> None:
        inputs = {name: np.concatenate([s.inputs[name] for s in batch]) for name in batch[0].inputs}
        student = np.concatenate([s.student_scores for s in batch])
        teacher_scores = await self._ask_teacher(inputs, student.shape)
        if teacher_scores is None:
            self._errors.inc(len(student))
            return
        self._record(batch, teacher_scores)
        self._compared.inc(len(student))
        if self.capture is not None:
            self.capture.append(inputs, teacher_scores)
        if self.evidence is not None:
            await self.evidence.observe(batch, teacher_scores)

    async def _ask_teacher(
        self, inputs: Mapping[str, NDArray[Any]], shape: tuple[int, ...]
    ) -> NDArray[np.float32] | None:
        if not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.teacher_timeout_seconds):
                scores = await self.teacher.infer(inputs)
            if scores.shape != shape:
                raise TeacherError(f"teacher scores {scores.shape}, the student's are {shape}")
        except Exception as exc:  # whatever the backend raised, the teacher failed this batch
            self.breaker.record_failure()
            log.warning("teacher %s of %s: %r", self.teacher.name, self.queue.model, exc)
            return None
        self.breaker.record_success()
        return scores

    def _record(self, batch: Sequence[ShadowSample], teacher_scores: NDArray[np.float32]) -> None:
        offsets = np.cumsum([0] + [s.rows for s in batch]).tolist()
        by_version: dict[str, list[int]] = {}
        for i, sample in enumerate(batch):
            by_version.setdefault(sample.version, []).append(i)
        for version, members in by_version.items():
            student = np.concatenate([batch[i].student_scores for i in members])
            teacher = np.concatenate([teacher_scores[offsets[i] : offsets[i + 1]] for i in members])
            self.recorder.record(version, student, teacher)
        if self.feedback is not None:
            for i, sample in enumerate(batch):
                rows = teacher_scores[offsets[i] : offsets[i + 1]]
                self.feedback.attach_teacher(sample.request_id, rows)


def _same_shapes(batch: Sequence[ShadowSample]) -> list[list[ShadowSample]]:
    """`batch` split into groups that concatenate: the same input names, dtypes and shapes
    beyond the rows, and the same scores shape beyond the rows (first-seen order; usually one
    group)."""
    groups: dict[tuple[Any, ...], list[ShadowSample]] = {}
    for sample in batch:
        key = (
            tuple((n, a.dtype, a.shape[1:]) for n, a in sample.inputs.items()),
            sample.student_scores.shape[1:],
        )
        groups.setdefault(key, []).append(sample)
    return list(groups.values())
