"""monitoring/recent.py: the one window behind /v1/fidelity, /v1/slo and the monitor, checked
against independent computations (scipy, a brute-force histogram_quantile)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy.stats import entropy

from kdgate.monitoring import fidelity
from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS, Metrics, bucket_counts
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _probs(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_summary_matches_an_independent_computation_and_forgets_old_data() -> None:
    rng = np.random.default_rng(3)
    clock = Clock()
    window = RecentWindow(window_seconds=60, bucket_seconds=10, clock=clock)
    recorder = FidelityRecorder(Metrics(CollectorRegistry()), "digits", window=window)

    stale_s, stale_t = rng.normal(size=(50, 10)), rng.normal(size=(50, 10))
    recorder.record_comparison("1", stale_s, stale_t)
    clock.now = 100.0  # the stale batch is out of the window now
    s1, t1 = rng.normal(size=(80, 10)), rng.normal(size=(80, 10))
    s2, t2 = rng.normal(size=(40, 10)), rng.normal(size=(40, 10))
    labels = rng.integers(0, 10, 80)
    recorder.record_comparison("1", s1, t1)
    clock.now = 125.0
    recorder.record_comparison("2", s2, t2)
    recorder.record_labels("1", s1, labels)
    recorder.record_labels(TEACHER_VERSION, t1, labels)

    s, t = np.vstack([s1, s2]), np.vstack([t1, t2])
    summary = window.figures("digits")
    assert summary.samples == 120
    assert summary.agreement == pytest.approx(np.mean(s.argmax(1) == t.argmax(1)))
    assert summary.mean_kl == pytest.approx(entropy(_probs(t), _probs(s), axis=1).mean(), rel=1e-9)
    assert summary.ece_teacher == pytest.approx(
        fidelity.ece(fidelity.calibration_against(s, t.argmax(1)))
    )
    assert summary.label_samples == 80
    assert summary.label_accuracy == pytest.approx(np.mean(s1.argmax(1) == labels))
    assert summary.ece_label == pytest.approx(
        fidelity.ece(fidelity.calibration_against(s1, labels))
    )
    assert summary.teacher_label_accuracy == pytest.approx(np.mean(t1.argmax(1) == labels))

    only_2 = window.figures("digits", "2")
    assert only_2.samples == 40
    assert only_2.label_samples == 0
    assert only_2.label_accuracy is None and only_2.ece_label is None


def test_an_empty_window_has_no_ratios() -> None:
    summary = RecentWindow(clock=Clock()).figures("digits")
    assert summary.samples == 0
    assert summary.agreement is None
    assert summary.mean_kl is None
    assert summary.ece_teacher is None
    assert summary.teacher_label_accuracy is None


def brute_force_p95(latencies: list[float]) -> float:
    """histogram_quantile by hand: the bucket of rank 0.95 * n, linear inside it."""
    bounds = [0.0, *LATENCY_BUCKETS_SECONDS]
    counts = [sum(1 for x in latencies if lo < x <= hi) for lo, hi in pairwise(bounds)]
    rank, seen = 0.95 * len(latencies), 0
    for i, c in enumerate(counts):
        if seen + c >= rank:
            return bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - seen) / c
        seen += c
    raise AssertionError


def test_p95_over_versions_and_window() -> None:
    clock = Clock()
    clock.now = 1000.0
    window = RecentWindow(window_seconds=60, bucket_seconds=10, clock=clock)
    upper = np.array([*LATENCY_BUCKETS_SECONDS, np.inf])
    assert window.figures("m").p95_latency_seconds is None
    rng = np.random.default_rng(0)
    old = rng.uniform(0.5, 0.9, 100)  # slow requests that will leave the window
    window.add_latency("m", "1", bucket_counts(upper, old))
    clock.now += 120
    recent = rng.exponential(0.002, 500)
    window.add_latency("m", "1", bucket_counts(upper, recent[::2]))
    window.add_latency("m", "2", bucket_counts(upper, recent[1::2]))
    figures = window.figures("m")
    assert figures.requests == 500
    assert figures.p95_latency_seconds is not None
    assert abs(figures.p95_latency_seconds - brute_force_p95(list(recent))) < 1e-12
    assert window.figures("m", "2").requests == 250
    assert window.figures("other").p95_latency_seconds is None


def test_drift_is_forgotten_once_older_than_the_window() -> None:
    clock = Clock()
    window = RecentWindow(window_seconds=60, bucket_seconds=10, clock=clock)
    assert window.drift("m") is None
    window.set_drift("m", 0.25, 1000)
    found = window.drift("m")
    assert found is not None and (found.share, found.rows) == (0.25, 1000)
    clock.now = 61.0
    assert window.drift("m") is None
