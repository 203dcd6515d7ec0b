import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder


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
    assert len(store._gone) == 100
