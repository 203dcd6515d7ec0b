import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy.stats import entropy

from kdgate.monitoring import fidelity, metrics
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder


def _scores(seed: int, n: int, c: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.5, size=(n, c)).astype(np.float32)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _promql_ece(registry: CollectorRegistry, model: str, version: str, reference: str) -> float:
    """DESIGN.md ECE over the exported counters: sum_bin |correct - confidence| / samples."""
    labels = {"model": model, "version": version, "reference": reference}
    num = 0.0
    den = 0.0
    for b in range(15):
        correct = _value(registry, "kdgate_calibration_correct_total", bin=str(b), **labels)
        conf = _value(registry, "kdgate_calibration_confidence_total", bin=str(b), **labels)
        num += abs(correct - conf)
        den += _value(registry, "kdgate_calibration_samples_total", bin=str(b), **labels)
    return num / den


def test_bins_agree_with_the_instruments() -> None:
    assert metrics.CALIBRATION_BINS == fidelity.CALIBRATION_BINS


def test_comparison_counters_match_an_independent_computation() -> None:
    registry = CollectorRegistry()
    recorder = FidelityRecorder(Metrics(registry), "digits")
    student, teacher = _scores(1, 300), _scores(2, 300)
    teacher[:150] = student[:150] + 0.05  # half the rows agree by construction
    for lo in range(0, 300, 64):
        recorder.record_comparison("1", student[lo : lo + 64], teacher[lo : lo + 64])

    s64, t64 = student.astype(np.float64), teacher.astype(np.float64)
    p_s = np.exp(s64 - s64.max(1, keepdims=True))
    p_s /= p_s.sum(1, keepdims=True)
    p_t = np.exp(t64 - t64.max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    kl = entropy(p_t, p_s, axis=1)
    agree = p_s.argmax(1) == p_t.argmax(1)
    mv = {"model": "digits", "version": "1"}
    assert _value(registry, "kdgate_fidelity_samples_total", **mv) == 300
    assert _value(registry, "kdgate_fidelity_agreements_total", **mv) == agree.sum()
    assert _value(registry, "kdgate_fidelity_kl_divergence_nats_count", **mv) == 300
    assert _value(registry, "kdgate_fidelity_kl_divergence_nats_sum", **mv) == pytest.approx(
        kl.sum(), rel=1e-9
    )
    # One observation per sample: each cumulative bucket counts the rows with KL <= its bound.
    for bound in metrics.KL_BUCKETS_NATS:
        got = _value(registry, "kdgate_fidelity_kl_divergence_nats_bucket", le=str(bound), **mv)
        assert got == np.count_nonzero(kl <= bound)

    conf = p_s.max(1)
    bins = np.minimum((conf * 15).astype(int), 14)
    teacher_ref = {**mv, "reference": "teacher"}
    for b in range(15):
        in_bin = bins == b
        assert (
            _value(registry, "kdgate_calibration_samples_total", bin=str(b), **teacher_ref)
            == in_bin.sum()
        )
        assert (
            _value(registry, "kdgate_calibration_correct_total", bin=str(b), **teacher_ref)
            == (agree & in_bin).sum()
        )
        assert _value(
            registry, "kdgate_calibration_confidence_total", bin=str(b), **teacher_ref
        ) == pytest.approx(conf[in_bin].sum(), rel=1e-9, abs=1e-12)

    # ECE from the exported counters (the PromQL formula) equals the in-process ECE.
    expected = fidelity.ece(fidelity.calibration_against(student, teacher.argmax(1)))
    assert _promql_ece(registry, "digits", "1", "teacher") == pytest.approx(expected, rel=1e-12)


def test_label_counters_for_student_and_teacher() -> None:
    registry = CollectorRegistry()
    recorder = FidelityRecorder(Metrics(registry), "digits")
    logits, teacher = _scores(3, 200), _scores(4, 200)
    labels = np.random.default_rng(5).integers(0, 10, 200)
    recorder.record_labels("2", logits, labels)
    recorder.record_labels(TEACHER_VERSION, teacher, labels)
    for version, scores in (("2", logits), (TEACHER_VERSION, teacher)):
        ref = {"model": "digits", "version": version, "reference": "label"}
        correct = sum(
            _value(registry, "kdgate_calibration_correct_total", bin=str(b), **ref)
            for b in range(15)
        )
        samples = sum(
            _value(registry, "kdgate_calibration_samples_total", bin=str(b), **ref)
            for b in range(15)
        )
        assert samples == 200
        assert correct / samples == pytest.approx(np.mean(scores.argmax(1) == labels))
        expected = fidelity.ece(fidelity.calibration_against(scores, labels))
        assert _promql_ece(registry, "digits", version, "label") == pytest.approx(
            expected, rel=1e-12
        )


def test_bind_exports_zero_series_for_both_references() -> None:
    registry = CollectorRegistry()
    FidelityRecorder(Metrics(registry), "digits").bind("1")
    for reference in ("teacher", "label"):
        for b in range(15):
            labels = {"model": "digits", "version": "1", "reference": reference, "bin": str(b)}
            assert registry.get_sample_value("kdgate_calibration_samples_total", labels) == 0.0
    assert (
        registry.get_sample_value(
            "kdgate_fidelity_samples_total", {"model": "digits", "version": "1"}
        )
        == 0.0
    )
    assert (
        registry.get_sample_value(
            "kdgate_fidelity_kl_divergence_nats_count", {"model": "digits", "version": "1"}
        )
        == 0.0
    )


def test_a_probabilities_teacher_and_a_logits_student_give_the_logits_pair_figures() -> None:
    """The same distributions as logits on both sides, or with the teacher (and its label
    calibration) as probabilities: the exported counters are the same."""
    from scipy.special import softmax

    student, teacher = _scores(3, 500, 7), _scores(4, 500, 7)
    labels = np.random.default_rng(5).integers(0, 7, 500)
    exported = []
    for teacher_kind in ("logits", "probabilities"):
        registry = CollectorRegistry()
        recorder = FidelityRecorder(Metrics(registry), "m", teacher_kind=teacher_kind)
        scores = teacher if teacher_kind == "logits" else softmax(teacher.astype(np.float64), 1)
        recorder.record("1", student, scores)
        recorder.record_labels(TEACHER_VERSION, scores, labels)
        exported.append(
            (
                _value(registry, "kdgate_fidelity_kl_divergence_nats_sum", model="m", version="1"),
                _value(registry, "kdgate_fidelity_agreements_total", model="m", version="1"),
                _promql_ece(registry, "m", "1", "teacher"),
                _promql_ece(registry, "m", TEACHER_VERSION, "label"),
            )
        )
    logits_pair, mixed_pair = exported
    assert mixed_pair == pytest.approx(logits_pair, rel=1e-9)
    p_t, p_s = softmax(teacher.astype(np.float64), 1), softmax(student.astype(np.float64), 1)
    assert logits_pair[0] == pytest.approx(entropy(p_t, p_s, axis=1).sum(), rel=1e-6)


def test_regression_pairs_export_error_histograms_and_no_classification() -> None:
    registry = CollectorRegistry()
    recorder = FidelityRecorder(
        Metrics(registry), "price", student_kind="regression", teacher_kind="regression"
    )
    recorder.bind("1")
    student = np.array([[1.0], [2.0], [4.0]], np.float32)
    teacher = np.array([[1.0], [2.5], [2.0]], np.float32)
    recorder.record("1", student, teacher)
    mv = {"model": "price", "version": "1"}
    assert _value(registry, "kdgate_regression_abs_error_count", **mv) == 3
    assert _value(registry, "kdgate_regression_abs_error_sum", **mv) == pytest.approx(2.5)
    assert _value(registry, "kdgate_regression_rel_error_sum", **mv) == pytest.approx(0.2 + 1.0)
    assert _value(registry, "kdgate_regression_abs_error_bucket", le="0.5", **mv) == 2
    assert registry.get_sample_value("kdgate_fidelity_samples_total", mv) is None
    assert recorder.record_labels("1", student, [0, 0, 0]).total == 0
    with pytest.raises(ValueError, match="cannot compare"):
        FidelityRecorder(Metrics(CollectorRegistry()), "m", student_kind="regression")
