import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax as scipy_log_softmax
from scipy.special import rel_entr, softmax
from scipy.stats import entropy

from kdgate.monitoring import fidelity
from kdgate.monitoring.fidelity import CALIBRATION_BINS

KINDS = ("logits", "probabilities")


def _logits(seed: int, n: int = 200, c: int = 10, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=(n, c)).astype(np.float32)


def _brute_softmax(row: np.ndarray) -> list[float]:
    exps = [math.exp(float(v) - float(max(row))) for v in row]
    return [e / sum(exps) for e in exps]


logit_matrices = st.integers(1, 8).flatmap(
    lambda c: arrays(
        np.float64,
        st.tuples(st.integers(1, 16), st.just(c)),
        elements=st.floats(-50, 50, allow_nan=False),
    )
)


def test_log_softmax_matches_scipy_and_survives_huge_logits() -> None:
    z = _logits(0)
    np.testing.assert_allclose(
        fidelity.log_softmax(z), scipy_log_softmax(z.astype(np.float64), axis=1), atol=1e-12
    )
    huge = np.array([[1000.0, 0.0, -1000.0]])
    out = fidelity.log_softmax(huge)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(fidelity.softmax(huge).sum(axis=1), 1.0)


def test_top1_confidence_is_brute_force_max_softmax() -> None:
    z = _logits(1, n=50)
    prediction, confidence = fidelity.top1(z)
    for i, row in enumerate(z):
        probs = _brute_softmax(row)
        assert prediction[i] == max(range(len(probs)), key=probs.__getitem__)
        assert confidence[i] == pytest.approx(max(probs), rel=1e-12)


def test_kl_from_logits_matches_scipy() -> None:
    t, s = _logits(2), _logits(3)
    expected = entropy(fidelity.softmax(t), fidelity.softmax(s), axis=1)
    np.testing.assert_allclose(fidelity.kl_from_logits(t, s), expected, rtol=1e-9, atol=1e-12)
    via_rel_entr = rel_entr(fidelity.softmax(t), fidelity.softmax(s)).sum(axis=1)
    np.testing.assert_allclose(fidelity.kl_from_logits(t, s), via_rel_entr, rtol=1e-9, atol=1e-12)


def test_kl_from_logits_needs_no_epsilon_where_probabilities_underflow() -> None:
    # exp(-800) underflows to 0 in float64, yet the KL of these rows is finite and exact.
    t = np.array([[0.0, -800.0]])
    s = np.array([[-800.0, 0.0]])
    assert fidelity.kl_from_logits(t, s)[0] == pytest.approx(800.0, rel=1e-12)


def test_kl_from_probs_clips_and_renormalises() -> None:
    p = fidelity.softmax(_logits(4))
    q = fidelity.softmax(_logits(5))
    q[:, 0] = 0.0  # a zero in the student makes the unclipped KL infinite
    eps = 1e-9
    pc = np.clip(p, eps, 1.0)
    qc = np.clip(q, eps, 1.0)
    expected = entropy(
        pc / pc.sum(axis=1, keepdims=True), qc / qc.sum(axis=1, keepdims=True), axis=1
    )
    got = fidelity.kl_from_probs(p, q, eps=eps)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_js_distance_matches_scipy_including_zeros() -> None:
    p = fidelity.softmax(_logits(6, n=40))
    q = fidelity.softmax(_logits(7, n=40))
    p[::3, 1] = 0.0
    q[::4, 2] = 0.0
    expected = [jensenshannon(p[i], q[i]) for i in range(len(p))]
    np.testing.assert_allclose(fidelity.js_distance(p, q), expected, rtol=1e-9, atol=1e-12)


def test_js_distance_of_disjoint_supports_is_sqrt_ln2() -> None:
    assert fidelity.js_distance([[1.0, 0.0]], [[0.0, 1.0]])[0] == pytest.approx(
        math.sqrt(math.log(2))
    )


def test_bin_edges() -> None:
    edges = np.array([0.0, 1 / 30, 1 / 15, 0.5, 14 / 15, 0.999999, 1.0])
    assert fidelity.bin_index(edges).tolist() == [0, 0, 1, 7, 14, 14, 14]
    with pytest.raises(ValueError, match="within"):
        fidelity.bin_index([1.5])


def test_calibration_and_ece_match_brute_force_loops() -> None:
    # A teacher close to the student: some bins over-, some under-confident, so a per-bin abs
    # and an abs of the total differ.
    student = _logits(8, n=500)
    teacher = student + _logits(9, n=500, scale=1.5)
    reference = teacher.argmax(axis=1)
    cal = fidelity.calibration_against(student, reference)

    samples = [0] * CALIBRATION_BINS
    conf_sum = [0.0] * CALIBRATION_BINS
    correct = [0] * CALIBRATION_BINS
    for row, ref in zip(student, reference, strict=True):
        probs = _brute_softmax(row)
        conf = max(probs)
        b = min(int(conf * CALIBRATION_BINS), CALIBRATION_BINS - 1)
        samples[b] += 1
        conf_sum[b] += conf
        correct[b] += int(probs.index(conf) == ref)
    assert cal.samples.tolist() == samples
    assert cal.correct.tolist() == correct
    np.testing.assert_allclose(cal.confidence, conf_sum, rtol=1e-12)

    # ECE in its textbook form: sum_b (n_b / N) * |acc_b - conf_b|.
    n = len(student)
    textbook = sum(
        samples[b] / n * abs(correct[b] / samples[b] - conf_sum[b] / samples[b])
        for b in range(CALIBRATION_BINS)
        if samples[b]
    )
    assert fidelity.ece(cal) == pytest.approx(textbook, rel=1e-12)
    assert cal.accuracy == pytest.approx(sum(correct) / n)


def test_ece_of_nothing_is_nan_and_calibrations_add() -> None:
    assert math.isnan(fidelity.ece(fidelity.empty_calibration()))
    a = fidelity.calibration([0.1, 0.9], [True, False])
    b = fidelity.calibration([0.95], [True])
    both = fidelity.calibration([0.1, 0.9, 0.95], [True, False, True])
    total = a + b
    assert total.samples.tolist() == both.samples.tolist()
    assert total.correct.tolist() == both.correct.tolist()
    np.testing.assert_allclose(total.confidence, both.confidence)


def test_compare_bundles_the_pieces() -> None:
    s, t = _logits(10), _logits(11)
    out = fidelity.compare(s, t)
    assert out.agree.tolist() == fidelity.agreement(s, t).tolist()
    np.testing.assert_array_equal(out.kl, fidelity.kl_from_logits(t, s))
    assert out.calibration.correct.sum() == out.agree.sum()


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity.kl_from_logits(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fidelity.softmax(np.zeros(3))


@settings(max_examples=200, deadline=None)
@given(logit_matrices, st.data())
def test_properties_of_kl_and_js(t: np.ndarray, data: st.DataObject) -> None:
    s = data.draw(arrays(np.float64, t.shape, elements=st.floats(-50, 50, allow_nan=False)))
    shift = data.draw(st.floats(-100, 100))
    kl = fidelity.kl_from_logits(t, s)
    assert (kl >= 0).all()
    np.testing.assert_allclose(fidelity.kl_from_logits(t, t), 0.0, atol=1e-12)
    # Softmax is invariant to adding a constant to every logit of a row.
    np.testing.assert_allclose(
        fidelity.kl_from_logits(t + shift, s - shift), kl, atol=1e-9, rtol=1e-9
    )
    np.testing.assert_allclose(
        kl, entropy(fidelity.softmax(t), fidelity.softmax(s), axis=1), rtol=1e-6, atol=1e-9
    )
    p, q = fidelity.softmax(t), fidelity.softmax(s)
    js = fidelity.js_distance(p, q)
    np.testing.assert_allclose(js, fidelity.js_distance(q, p), atol=1e-12)
    assert (js <= math.sqrt(math.log(2)) + 1e-12).all()
    with np.errstate(invalid="ignore"):  # scipy takes sqrt of a rounding-negative divergence
        reference = np.nan_to_num([jensenshannon(p[i], q[i]) for i in range(len(p))])
    np.testing.assert_allclose(js, reference, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, st.integers(0, 64), elements=st.floats(0, 1)),
    st.data(),
)
def test_properties_of_calibration(conf: np.ndarray, data: st.DataObject) -> None:
    hit = data.draw(arrays(np.bool_, conf.shape))
    cal = fidelity.calibration(conf, hit)
    assert cal.total == len(conf)
    assert (cal.correct <= cal.samples).all()
    np.testing.assert_allclose(cal.confidence.sum(), conf.sum(), atol=1e-9)
    # Each bin's confidences lie within its edges, so its sum is bounded by count * edges.
    lower = np.arange(CALIBRATION_BINS) / CALIBRATION_BINS
    upper = (np.arange(CALIBRATION_BINS) + 1) / CALIBRATION_BINS
    assert (cal.confidence >= cal.samples * lower - 1e-9).all()
    assert (cal.confidence <= cal.samples * upper + 1e-9).all()
    if len(conf):
        assert 0.0 <= fidelity.ece(cal) <= 1.0
        brute = sum(
            abs(
                float(hit[fidelity.bin_index(conf) == b].sum())
                - float(conf[fidelity.bin_index(conf) == b].sum())
            )
            for b in range(CALIBRATION_BINS)
        )
        assert fidelity.ece(cal) == pytest.approx(brute / len(conf), abs=1e-12)


def _brute_force_ece(probs: np.ndarray, reference: np.ndarray) -> float:
    correct = [0.0] * CALIBRATION_BINS
    confidence = [0.0] * CALIBRATION_BINS
    for row, ref in zip(probs, reference, strict=True):
        top = int(np.argmax(row))
        b = min(int(row[top] * CALIBRATION_BINS), CALIBRATION_BINS - 1)
        confidence[b] += float(row[top])
        correct[b] += float(top == ref)
    return sum(abs(a - b) for a, b in zip(correct, confidence, strict=True)) / len(probs)


@pytest.mark.parametrize(("student_kind", "teacher_kind"), [(s, t) for s in KINDS for t in KINDS])
def test_compare_reads_each_side_as_its_kind(student_kind: str, teacher_kind: str) -> None:
    """Probabilities are used as they are (never softmaxed again), logits are softmaxed; every
    mix gives scipy's figures on the same distributions."""
    rng = np.random.default_rng(11)
    s_logits, t_logits = rng.normal(0, 2, (400, 6)), rng.normal(0, 2, (400, 6))
    p_s, p_t = softmax(s_logits, axis=1), softmax(t_logits, axis=1)
    student = s_logits if student_kind == "logits" else p_s
    teacher = t_logits if teacher_kind == "logits" else p_t
    got = fidelity.compare(student, teacher, student_kind=student_kind, teacher_kind=teacher_kind)
    np.testing.assert_allclose(got.kl, entropy(p_t, p_s, axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got.agree, p_s.argmax(1) == p_t.argmax(1))
    assert fidelity.ece(got.calibration) == pytest.approx(
        _brute_force_ece(p_s, p_t.argmax(1)), rel=1e-9
    )
    labels = rng.integers(0, 6, 400)
    cal = fidelity.calibration_against(student, labels, student_kind)
    assert fidelity.ece(cal) == pytest.approx(_brute_force_ece(p_s, labels), rel=1e-9)


def test_probabilities_are_clipped_not_softmaxed() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    log_p = fidelity.log_probabilities(probs, "probabilities")
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0)
    assert np.exp(log_p[0, 1]) == pytest.approx(1e-12, rel=1e-6)
    np.testing.assert_allclose(np.exp(log_p[1]), probs[1], rtol=1e-12)
    with pytest.raises(ValueError, match="regression"):
        fidelity.log_probabilities(probs, "regression")


def test_regression_errors_per_value() -> None:
    student = np.array([[1.0, 2.0], [0.0, -3.0]])
    teacher = np.array([[1.5, 2.0], [0.0, -2.0]])
    errors = fidelity.regression_errors(student, teacher)
    np.testing.assert_allclose(errors.absolute, [0.5, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(errors.relative, [0.5 / 1.5, 0.0, 0.0, 0.5])
    assert fidelity.regression_errors([1.0], [0.0]).relative[0] == np.inf
