import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy.stats import entropy

from kdgate.monitoring import fidelity
from kdgate.monitoring.fidelity_window import FidelityWindow
from kdgate.monitoring.metrics import Metrics
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
    window = FidelityWindow(window_seconds=60, bucket_seconds=10, clock=clock)
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
    summary = window.summary()
    assert summary["samples"] == 120
    assert summary["agreement"] == pytest.approx(np.mean(s.argmax(1) == t.argmax(1)))
    assert summary["mean_kl"] == pytest.approx(
        entropy(_probs(t), _probs(s), axis=1).mean(), rel=1e-9
    )
    assert summary["ece_teacher"] == pytest.approx(
        fidelity.ece(fidelity.calibration_against(s, t.argmax(1)))
    )
    assert summary["label_samples"] == 80
    assert summary["label_accuracy"] == pytest.approx(np.mean(s1.argmax(1) == labels))
    assert summary["ece_label"] == pytest.approx(
        fidelity.ece(fidelity.calibration_against(s1, labels))
    )
    assert summary["teacher_label_accuracy"] == pytest.approx(np.mean(t1.argmax(1) == labels))

    only_2 = window.summary("2")
    assert only_2["samples"] == 40
    assert only_2["label_samples"] == 0
    assert only_2["label_accuracy"] is None and only_2["ece_label"] is None


def test_an_empty_window_has_no_ratios() -> None:
    summary = FidelityWindow(clock=Clock()).summary()
    assert summary["samples"] == 0
    assert summary["agreement"] is None
    assert summary["mean_kl"] is None
    assert summary["ece_teacher"] is None
    assert summary["teacher_label_accuracy"] is None
