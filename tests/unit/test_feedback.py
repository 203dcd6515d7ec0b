import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder
from tests.support.feedback_reference import ReferenceFeedbackStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _label_figures(registry: CollectorRegistry, version: str) -> tuple[float, float, float]:
    """Accuracy and ECE as PromQL derives them from the three label-referenced counters."""
    samples = correct = gap = 0.0
    for b in range(15):
        labels = {"model": "digits", "version": version, "reference": "label", "bin": str(b)}
        n = registry.get_sample_value("kdgate_calibration_samples_total", labels) or 0.0
        c = registry.get_sample_value("kdgate_calibration_correct_total", labels) or 0.0
        conf = registry.get_sample_value("kdgate_calibration_confidence_total", labels) or 0.0
        samples += n
        correct += c
        gap += abs(c - conf)
    return samples, correct / samples, gap / samples


def _independent_accuracy_and_ece(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Textbook reliability-diagram ECE, computed row by row without monitoring.fidelity."""
    n_bins = 15
    counts = [0] * n_bins
    conf_sum = [0.0] * n_bins
    hits = [0] * n_bins
    for row, label in zip(logits.astype(np.float64), labels, strict=True):
        p = np.exp(row - row.max())
        p /= p.sum()
        b = min(int(p.max() * n_bins), n_bins - 1)
        counts[b] += 1
        conf_sum[b] += p.max()
        hits[b] += int(p.argmax() == label)
    n = len(labels)
    ece = sum(
        counts[b] / n * abs(hits[b] / counts[b] - conf_sum[b] / counts[b])
        for b in range(n_bins)
        if counts[b]
    )
    return sum(hits) / n, ece


def test_labels_for_1000_predictions_give_the_independent_accuracy_and_ece() -> None:
    rng = np.random.default_rng(7)
    n = 1000
    labels = rng.integers(0, 10, n)
    # Logits that are right about 80% of the time, with varied confidence.
    student = rng.normal(0, 1.5, size=(n, 10)).astype(np.float32)
    student[np.arange(n), labels] += rng.uniform(0, 4, n).astype(np.float32)
    teacher = rng.normal(0, 1.0, size=(n, 10)).astype(np.float32)
    teacher[np.arange(n), labels] += 3.0
    shadowed = np.arange(n) % 2 == 0

    registry = CollectorRegistry()
    window = RecentWindow(window_seconds=300, clock=Clock())
    store = FeedbackStore(
        FidelityRecorder(Metrics(registry), "digits", window=window), max_size=5000
    )
    for i in range(n):
        store.put(f"id-{i}", "1", student[i], shadowed=bool(shadowed[i]))
    for i in np.flatnonzero(shadowed):
        store.attach_teacher(f"id-{i}", teacher[i : i + 1])
    answer = store.apply_feedback([{"id": f"id-{i}", "label": int(labels[i])} for i in range(n)])
    assert answer == {"accepted": n, "unknown": [], "expired": [], "duplicate": [], "invalid": []}

    count, accuracy, ece = _label_figures(registry, "1")
    want_accuracy, want_ece = _independent_accuracy_and_ece(student, labels)
    assert count == n
    assert accuracy == pytest.approx(want_accuracy, rel=1e-12)
    assert ece == pytest.approx(want_ece, rel=1e-9)

    count, accuracy, ece = _label_figures(registry, TEACHER_VERSION)
    want_accuracy, want_ece = _independent_accuracy_and_ece(teacher[shadowed], labels[shadowed])
    assert count == shadowed.sum()
    assert accuracy == pytest.approx(want_accuracy, rel=1e-12)
    assert ece == pytest.approx(want_ece, rel=1e-9)

    figures = window.figures("digits")
    assert figures.label_samples == n
    assert figures.label_accuracy == pytest.approx(
        _independent_accuracy_and_ece(student, labels)[0]
    )
    assert figures.teacher_label_samples == shadowed.sum()


def test_unknown_expired_duplicate_and_invalid_ids_are_reported() -> None:
    clock = Clock()
    store = FeedbackStore(
        FidelityRecorder(Metrics(CollectorRegistry()), "digits"),
        max_size=3,
        ttl_seconds=60,
        clock=clock,
    )
    logits = np.eye(1, 10, 4)
    store.put("old", "1", logits)
    clock.now = 30.0
    for name in ("a", "b", "c"):
        store.put(name, "1", logits)  # "old" is pushed out by size
    store.put("pair", "1", np.vstack([logits, logits]))  # and now "a" as well
    clock.now = 61.0  # "a".."c" and "pair" are 31 s old: still live
    answer = store.apply_feedback(
        [
            {"id": "old", "label": 4},
            {"id": "nobody", "label": 4},
            {"id": "b", "label": 4},
            {"id": "b", "label": 4},
            {"id": "c", "label": 10},
            {"id": "pair", "label": 4},
            {"id": 17, "label": 4},
        ]
    )
    assert answer == {
        "accepted": 1,
        "unknown": ["nobody"],
        "expired": ["old"],
        "duplicate": ["b"],
        "invalid": ["c", "pair", 17],
    }
    assert store.apply_feedback([{"id": "pair", "label": [4, "x"]}])["invalid"] == ["pair"]
    assert store.apply_feedback([{"id": "pair", "label": [4, 3]}])["accepted"] == 1
    clock.now = 200.0  # past the TTL of "c"
    assert store.apply_feedback([{"id": "c", "label": 4}])["expired"] == ["c"]
    assert len(store) == 0


def test_labels_before_the_teacher_are_applied_when_it_answers() -> None:
    registry = CollectorRegistry()
    store = FeedbackStore(
        FidelityRecorder(Metrics(registry), "digits"), class_labels=[str(i) for i in range(10)]
    )
    store.put("r", "1", np.eye(1, 10, 2), shadowed=True)
    assert store.apply_feedback([{"id": "r", "label": "2"}])["accepted"] == 1

    def teacher_samples() -> float:
        return sum(
            registry.get_sample_value(
                "kdgate_calibration_samples_total",
                {"model": "digits", "version": "teacher", "reference": "label", "bin": str(b)},
            )
            or 0.0
            for b in range(15)
        )

    assert teacher_samples() == 0
    store.attach_teacher("r", np.eye(1, 10, 2) * 5)
    assert teacher_samples() == 1
    assert store.apply_feedback([{"id": "r", "label": 2}])["duplicate"] == ["r"]


def test_put_is_bounded() -> None:
    store = FeedbackStore(FidelityRecorder(Metrics(CollectorRegistry()), "digits"), max_size=100)
    for i in range(10_000):
        store.put(str(i), "1", np.zeros(10))
    assert len(store) == 100
    assert store.tombstones == 100


def test_a_full_store_of_50000_predictions_costs_a_few_mib() -> None:
    n, classes = 50_000, 10
    logits = np.random.default_rng(0).normal(size=(n, classes)).astype(np.float32)
    ids = [f"{i:032x}" for i in range(2 * n)]  # uuid-hex-sized ids
    clock = Clock()
    tracemalloc.start()
    try:
        store = FeedbackStore(
            FidelityRecorder(Metrics(CollectorRegistry()), "digits"),
            max_size=n,
            class_labels=[str(c) for c in range(classes)],
            clock=clock,
        )
        for start in range(0, 2 * n, 64):  # the second n push the first n out as tombstones
            store.put_many(
                (ids[i], "1", logits[i % n : i % n + 1], i % 2 == 0)
                for i in range(start, min(start + 64, 2 * n))
            )
        for i in range(n, 2 * n, 2):
            store.attach_teacher(ids[i], logits[i - n])
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 4 MiB of it are the float32 logits themselves (student and teacher rows).
    # ~9 MiB of it the id index (a dict of 64-bit hashes; monitoring/id_index.py).
    assert used < 20 * 2**20, f"{used / 2**20:.1f} MiB"
    assert len(store) == n and store.tombstones == n
    answer = store.apply_feedback([{"id": ids[0], "label": 1}, {"id": ids[-1], "label": 1}])
    assert answer["expired"] == [ids[0]] and answer["accepted"] == 1


class Calls:
    """A recorder that keeps each `record_labels` call, to compare two stores' outputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[list[float]], list[int]]] = []

    def record_labels(self, version: str, logits: np.ndarray, labels: np.ndarray) -> None:
        self.calls.append((version, logits.tolist(), labels.tolist()))


IDS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
NEW_IDS = st.integers(1, 40).map(lambda n: f"new-{n}")  # as "put-new" names them
ROWS = st.sampled_from([(1, 4), (4,), (2, 4)])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.lists(st.tuples(IDS, st.sampled_from(["1", "2"]), ROWS, st.booleans()), max_size=4),
        ),
        # Ids never seen, usually single rows of the store's width: the bulk way of put_many.
        st.tuples(
            st.just("put-new"),
            st.lists(
                st.tuples(
                    st.sampled_from(["1", "2"]),
                    st.sampled_from([(1, 4), (1, 4), (1, 4), (1,)]),
                    st.booleans(),
                ),
                max_size=8,
            ),
        ),
        st.tuples(st.just("teacher"), st.one_of(IDS, NEW_IDS), ROWS),
        st.tuples(
            st.just("feedback"),
            st.lists(
                st.tuples(
                    st.one_of(IDS, NEW_IDS, st.just(7)),
                    st.one_of(
                        st.integers(-1, 4),
                        st.sampled_from(["x", "y", "z"]),
                        st.lists(st.integers(0, 3), min_size=1, max_size=3),
                    ),
                ),
                max_size=4,
            ),
        ),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 3.0, 6.0])),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(max_size=st.integers(1, 4), operations=OPERATIONS)
def test_the_compact_store_answers_as_the_reference_model(
    max_size: int, operations: list[tuple[Any, ...]]
) -> None:
    clock = Clock()
    calls, expected_calls = Calls(), Calls()
    options: dict[str, Any] = {
        "max_size": max_size,
        "ttl_seconds": 5.0,
        "class_labels": ["x", "y", "z", "w"],
        "clock": clock,
    }
    store = FeedbackStore(calls, **options)  # type: ignore[arg-type]
    reference = ReferenceFeedbackStore(expected_calls, **options)
    counter = 0.0
    for operation in operations:
        if operation[0] == "put":
            batch = []
            for request_id, version, shape, shadowed in operation[1]:
                counter += 1
                batch.append((request_id, version, np.full(shape, counter, np.float32), shadowed))
            store.put_many(batch)
            reference.put_many(batch)
        elif operation[0] == "put-new":
            batch = []
            for version, shape, shadowed in operation[1]:
                counter += 1
                logits = np.full(shape, counter, np.float32)
                batch.append((f"new-{counter:g}", version, logits, shadowed))
            store.put_many(batch)
            reference.put_many(batch)
        elif operation[0] == "teacher":
            counter += 1
            teacher = np.full(operation[2], -counter, np.float32)
            store.attach_teacher(operation[1], teacher)
            reference.attach_teacher(operation[1], teacher)
        elif operation[0] == "feedback":
            items = [{"id": request_id, "label": label} for request_id, label in operation[1]]
            assert store.apply_feedback(items) == reference.apply_feedback(items)
        else:
            clock.now += operation[1]
        assert len(store) == len(reference)
        assert store.tombstones == len(reference._gone)
        assert calls.calls == expected_calls.calls
