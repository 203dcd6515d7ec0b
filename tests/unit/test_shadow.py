import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy.stats import entropy

from kdgate.monitoring import fidelity
from kdgate.monitoring.breaker import CircuitBreaker
from kdgate.monitoring.capture import CaptureStore
from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recorder import FidelityRecorder
from kdgate.monitoring.shadow import ShadowQueue, ShadowSample, ShadowWorker, should_shadow
from kdgate.monitoring.teacher import TeacherError

RNG = np.random.default_rng(42)
W_TEACHER = RNG.normal(size=(8, 5)).astype(np.float32)
W_STUDENT = (W_TEACHER + RNG.normal(scale=0.4, size=(8, 5))).astype(np.float32)


class LinearTeacher:
    name = "linear"
    version = "7"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[int] = []
        self.busy = False
        self.fail = False

    async def infer(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        self.calls.append(len(batch["x"]))
        self.busy = True
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail:
                raise TeacherError("down")
            return (batch["x"] @ W_TEACHER).astype(np.float32)
        finally:
            self.busy = False

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sample(i: int, rows: int = 1, version: str = "1") -> ShadowSample:
    x = np.random.default_rng(i).uniform(-2, 2, size=(rows, 8)).astype(np.float32)
    return ShadowSample(f"req-{i}", version, {"x": x}, (x @ W_STUDENT).astype(np.float32))


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


def test_should_shadow_is_deterministic_and_honours_the_fraction() -> None:
    ids = [f"req-{i}" for i in range(100_000)]
    picked = [should_shadow(i, 0.1) for i in ids]
    assert picked == [should_shadow(i, 0.1) for i in ids]
    # Binomial(100000, 0.1): sd ~ 95, so 600 is > 6 sd.
    assert abs(sum(picked) - 10_000) < 600
    uuids = [
        str(uuid.UUID(int=int(x))) for x in np.random.default_rng(1).integers(0, 2**62, 20_000)
    ]
    assert abs(sum(should_shadow(u, 0.5) for u in uuids) - 10_000) < 600
    assert not any(should_shadow(i, 0.0) for i in ids[:1000])
    assert all(should_shadow(i, 1.0) for i in ids[:1000])
    # A smaller fraction shadows a subset of what a larger one does.
    assert all(should_shadow(i, 0.2) for i, p in zip(ids, picked, strict=True) if p)


def test_full_queue_drops_and_counts_rows() -> None:
    registry = CollectorRegistry()

    async def main() -> tuple[list[bool], int]:
        queue = ShadowQueue(Metrics(registry), "digits", capacity_rows=5)
        accepted = [queue.offer(_sample(i, rows=2)) for i in range(4)]
        return accepted, queue.rows

    accepted, rows = asyncio.run(main())
    assert accepted == [True, True, False, False]
    assert rows == 4
    assert _value(registry, "kdgate_shadow_total", model="digits", outcome="dropped") == 4
    assert _value(registry, "kdgate_shadow_queue_depth", model="digits") == 4


def test_take_respects_max_rows_but_always_takes_one() -> None:
    async def main() -> list[list[int]]:
        queue = ShadowQueue(Metrics(CollectorRegistry()), "m", capacity_rows=100)
        for i, rows in enumerate([3, 3, 10, 1]):
            queue.offer(_sample(i, rows=rows))
        return [[s.rows for s in queue.take(7)] for _ in range(3)]

    assert asyncio.run(main()) == [[3, 3], [10], [1]]


def test_worker_records_fidelity_capture_and_teacher_predictions(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    samples = [_sample(i, rows=1 + i % 3, version="1" if i % 4 else "2") for i in range(120)]

    async def main() -> FeedbackStore:
        recorder = FidelityRecorder(metrics, "digits")
        queue = ShadowQueue(metrics, "digits", capacity_rows=10_000)
        capture = CaptureStore(tmp_path, segment_rows=64, max_rows=10_000)
        feedback = FeedbackStore(recorder)
        for s in samples:
            feedback.put(s.request_id, s.version, s.student_scores, shadowed=True)
        teacher = LinearTeacher()
        worker = ShadowWorker(
            queue, teacher, recorder, capture=capture, feedback=feedback, max_batch=16
        )
        worker.start()
        for s in samples:
            assert queue.offer(s)
        await worker.stop(grace_seconds=5.0)
        await capture.aclose()
        assert max(teacher.calls) <= 16
        return feedback

    feedback = asyncio.run(main())
    total_rows = sum(s.rows for s in samples)
    assert _value(registry, "kdgate_shadow_total", model="digits", outcome="compared") == total_rows
    assert _value(registry, "kdgate_shadow_queue_depth", model="digits") == 0
    for version in ("1", "2"):
        mine = [s for s in samples if s.version == version]
        x = np.concatenate([s.inputs["x"] for s in mine]).astype(np.float64)
        t, st = x @ W_TEACHER, x @ W_STUDENT
        pt = np.exp(t - t.max(1, keepdims=True))
        ps = np.exp(st - st.max(1, keepdims=True))
        kl = entropy(pt / pt.sum(1, keepdims=True), ps / ps.sum(1, keepdims=True), axis=1)
        mv = {"model": "digits", "version": version}
        assert _value(registry, "kdgate_fidelity_samples_total", **mv) == len(x)
        assert _value(registry, "kdgate_fidelity_agreements_total", **mv) == np.sum(
            t.argmax(1) == st.argmax(1)
        )
        assert _value(registry, "kdgate_fidelity_kl_divergence_nats_sum", **mv) == pytest.approx(
            kl.sum(), rel=1e-4
        )

    stored_x, stored_t = [], []
    for path in sorted(tmp_path.glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            assert str(npz["teacher_kind"]) == "logits"
            stored_x.append(npz["inputs/x"])
            stored_t.append(npz["teacher_scores"])
    all_x = np.concatenate([s.inputs["x"] for s in samples])
    np.testing.assert_array_equal(np.concatenate(stored_x), all_x)
    np.testing.assert_allclose(np.concatenate(stored_t), all_x @ W_TEACHER, rtol=1e-5, atol=1e-5)
    # The teacher's logits reached the feedback store: a label now also counts for the teacher.
    answer = feedback.apply_feedback([{"id": "req-0", "label": 0}])
    assert answer["accepted"] == 1
    _, confidence = fidelity.top1(samples[0].inputs["x"] @ W_TEACHER)
    teacher_bin = str(fidelity.bin_index(confidence)[0])
    labels = {"model": "digits", "version": "teacher", "reference": "label", "bin": teacher_bin}
    assert _value(registry, "kdgate_calibration_samples_total", **labels) == 1


def test_a_slow_teacher_never_makes_offer_wait() -> None:
    registry = CollectorRegistry()

    async def main() -> tuple[int, int]:
        metrics = Metrics(registry)
        queue = ShadowQueue(metrics, "digits", capacity_rows=20)
        teacher = LinearTeacher(delay=0.2)
        worker = ShadowWorker(queue, teacher, FidelityRecorder(metrics, "digits"), max_batch=4)
        worker.start()
        queue.offer(_sample(0))
        await _until(lambda: teacher.busy)
        accepted = sum(queue.offer(_sample(i)) for i in range(1, 101))
        still_busy = teacher.busy  # every offer above returned during the first 200 ms call
        await worker.stop(grace_seconds=0.1)
        return accepted, int(still_busy)

    accepted, still_busy = asyncio.run(main())
    assert still_busy == 1
    assert accepted == 20
    assert _value(registry, "kdgate_shadow_total", model="digits", outcome="dropped") == 80


def test_failing_teacher_opens_the_breaker_then_a_probe_recovers() -> None:
    registry = CollectorRegistry()
    clock = Clock()

    async def main() -> None:
        metrics = Metrics(registry)
        queue = ShadowQueue(metrics, "digits", capacity_rows=1000)
        teacher = LinearTeacher()
        teacher.fail = True
        breaker = CircuitBreaker(failure_threshold=3, cooldown_seconds=30.0, clock=clock)
        worker = ShadowWorker(
            queue, teacher, FidelityRecorder(metrics, "digits"), breaker=breaker, max_batch=1
        )
        worker.start()

        def errors() -> float:
            return _value(registry, "kdgate_shadow_total", model="digits", outcome="teacher_error")

        for i in range(10):
            queue.offer(_sample(i))
        await _until(lambda: errors() == 10)
        assert breaker.state == "open"
        assert len(teacher.calls) == 3  # after 3 failures the teacher is not called any more

        teacher.fail = False
        queue.offer(_sample(10))
        await _until(lambda: errors() == 11)  # still inside the cool-down
        assert len(teacher.calls) == 3
        clock.now += 30.0
        queue.offer(_sample(11))  # the probe
        await _until(
            lambda: _value(registry, "kdgate_shadow_total", model="digits", outcome="compared") == 1
        )
        assert breaker.state == "closed"
        assert len(teacher.calls) == 4
        await worker.stop()

    asyncio.run(main())


def test_stop_cancels_a_hung_teacher_after_the_timeout() -> None:
    async def main() -> float:
        metrics = Metrics(CollectorRegistry())
        queue = ShadowQueue(metrics, "digits")
        teacher = LinearTeacher(delay=60.0)
        worker = ShadowWorker(queue, teacher, FidelityRecorder(metrics, "digits"))
        worker.start()
        queue.offer(_sample(0))
        await _until(lambda: teacher.busy)
        started = time.monotonic()
        await worker.stop(grace_seconds=0.2)
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0


def test_teacher_timeout_counts_as_an_error() -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        metrics = Metrics(registry)
        queue = ShadowQueue(metrics, "digits")
        worker = ShadowWorker(
            queue,
            LinearTeacher(delay=5.0),
            FidelityRecorder(metrics, "digits"),
            teacher_timeout_seconds=0.05,
        )
        worker.start()
        queue.offer(_sample(0, rows=3))
        await _until(
            lambda: (
                _value(registry, "kdgate_shadow_total", model="digits", outcome="teacher_error")
                == 3
            )
        )
        await worker.stop()

    asyncio.run(main())


def test_trace_hook_wraps_each_batch() -> None:
    seen: list[list[str]] = []

    class Hook:
        def __init__(self, batch: Sequence[ShadowSample]) -> None:
            self.batch = batch

        def __enter__(self) -> None:
            seen.append([s.request_id for s in self.batch])

        def __exit__(self, *exc: object) -> None:
            pass

    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        queue = ShadowQueue(metrics, "digits")
        worker = ShadowWorker(
            queue, LinearTeacher(), FidelityRecorder(metrics, "digits"), trace=Hook, max_batch=2
        )
        for i in range(3):
            queue.offer(_sample(i))
        worker.start()
        await worker.stop()

    asyncio.run(main())
    assert seen == [["req-0", "req-1"], ["req-2"]]


def test_worker_refuses_a_recorder_of_another_model() -> None:
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(ValueError, match="queue of"):
        ShadowWorker(ShadowQueue(metrics, "a"), LinearTeacher(), FidelityRecorder(metrics, "b"))


def test_an_idle_worker_lingers_to_batch_rows_that_arrive_together() -> None:
    async def main() -> list[int]:
        metrics = Metrics(CollectorRegistry())
        queue = ShadowQueue(metrics, "digits")
        teacher = LinearTeacher()
        worker = ShadowWorker(
            queue, teacher, FidelityRecorder(metrics, "digits"), linger_seconds=0.2
        )
        worker.start()
        await asyncio.sleep(0)  # the worker is now waiting on an empty queue
        for i in range(3):
            queue.offer(_sample(i))
            await asyncio.sleep(0.01)
        await _until(lambda: bool(teacher.calls))
        await worker.stop()
        return teacher.calls

    assert asyncio.run(main()) == [3]


class TokenTeacher:
    """A two-input teacher: scores = the masked mean of the ids, times a fixed row vector."""

    name = "tokens"
    version = "1"

    def __init__(self, classes: int = 3) -> None:
        self.calls: list[dict[str, tuple[int, ...]]] = []
        self.classes = classes

    async def infer(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        self.calls.append({k: v.shape for k, v in batch.items()})
        return _token_scores(batch["input_ids"], batch["attention_mask"], self.classes)

    async def aclose(self) -> None:
        pass


def _token_scores(ids: np.ndarray, mask: np.ndarray, classes: int = 3) -> np.ndarray:
    mean = (ids * mask).sum(axis=1) / mask.sum(axis=1)
    return (mean[:, None] * np.linspace(-1, 1, classes)[None, :] / 10).astype(np.float32)


def test_requests_of_other_sequence_lengths_go_to_the_teacher_in_separate_calls() -> None:
    registry = CollectorRegistry()
    rng = np.random.default_rng(3)
    samples = []
    for i, length in enumerate([6, 6, 9, 6, 9]):
        ids = rng.integers(0, 50, (2, length)).astype(np.int64)
        mask = np.ones_like(ids)
        student = _token_scores(ids, mask) + rng.normal(0, 0.1, (2, 3)).astype(np.float32)
        samples.append(
            ShadowSample(f"r{i}", "1", {"input_ids": ids, "attention_mask": mask}, student)
        )

    async def main() -> TokenTeacher:
        metrics = Metrics(registry)
        queue = ShadowQueue(metrics, "text", capacity_rows=100)
        teacher = TokenTeacher()
        worker = ShadowWorker(queue, teacher, FidelityRecorder(metrics, "text"), max_batch=64)
        for s in samples:
            queue.offer(s)
        await worker.process(queue.take(64))
        return teacher

    teacher = asyncio.run(main())
    assert teacher.calls == [
        {"input_ids": (6, 6), "attention_mask": (6, 6)},
        {"input_ids": (4, 9), "attention_mask": (4, 9)},
    ]
    assert _value(registry, "kdgate_shadow_total", model="text", outcome="compared") == 10
    student = np.concatenate([s.student_scores for s in samples]).astype(np.float64)
    teacher_scores = np.concatenate(
        [_token_scores(s.inputs["input_ids"], s.inputs["attention_mask"]) for s in samples]
    ).astype(np.float64)
    p_s = np.exp(student) / np.exp(student).sum(1, keepdims=True)
    p_t = np.exp(teacher_scores) / np.exp(teacher_scores).sum(1, keepdims=True)
    kl_sum = _value(registry, "kdgate_fidelity_kl_divergence_nats_sum", model="text", version="1")
    assert kl_sum == pytest.approx(entropy(p_t, p_s, axis=1).sum(), rel=1e-4)


def test_a_teacher_with_other_scores_shape_is_a_teacher_error() -> None:
    registry = CollectorRegistry()
    ids = np.ones((2, 4), np.int64)
    sample = ShadowSample("r", "1", {"input_ids": ids, "attention_mask": ids}, np.zeros((2, 3)))

    async def main() -> None:
        metrics = Metrics(registry)
        queue = ShadowQueue(metrics, "text", capacity_rows=10)
        worker = ShadowWorker(queue, TokenTeacher(classes=5), FidelityRecorder(metrics, "text"))
        queue.offer(sample)
        await worker.process(queue.take(10))

    asyncio.run(main())
    assert _value(registry, "kdgate_shadow_total", model="text", outcome="teacher_error") == 2
    assert _value(registry, "kdgate_shadow_total", model="text", outcome="compared") == 0
