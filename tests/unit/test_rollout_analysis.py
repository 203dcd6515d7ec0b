"""Rollout analysis: the interval maths against scipy and brute force, the decision rules, the
step syntax and the paired window's bounds."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats
from scipy.special import softmax

from kdgate.monitoring import fidelity
from kdgate.monitoring.rollout_analysis import (
    BOOTSTRAP_BLOCKS,
    Analysis,
    Criteria,
    PairedWindow,
    StepSpec,
    analyse,
    ece_difference,
    p95_nearest_rank,
    paired_interval,
    parse_steps,
)
from tests.support.fidelity_reference import brute_force_ece

CRITERIA = Criteria()


def _feed(
    window: PairedWindow,
    *,
    n: int,
    cand_agree: float,
    inc_agree: float,
    seed: int,
    classes: int = 10,
    shared: float = 0.7,
    cand_kl: float = 0.05,
    inc_kl: float = 0.05,
    prefix: str = "req",
    batch: int = 64,
) -> None:
    """Simulated shadow rows: each version agrees with the teacher at its rate; with probability
    `shared` a row's agreement draw is common to both (hard inputs are hard for both)."""
    rng = np.random.default_rng(seed)
    teacher = rng.integers(0, classes, n)
    common = rng.random(n)
    draws = [np.where(rng.random(n) < shared, common, rng.random(n)) for _ in range(2)]
    tops, confs = [], []
    for u, rate in zip(draws, (cand_agree, inc_agree), strict=True):
        wrong = (teacher + rng.integers(1, classes, n)) % classes
        tops.append(np.where(u < rate, teacher, wrong))
        confs.append(rng.uniform(0.9, 1.0, n))
    kls = [rng.exponential(cand_kl, n), rng.exponential(inc_kl, n)]
    for s in range(0, n, batch):
        part = slice(s, min(n, s + batch))
        window.add_classification(
            teacher_top1=teacher[part],
            candidate_top1=tops[0][part],
            incumbent_top1=tops[1][part],
            candidate_conf=confs[0][part],
            incumbent_conf=confs[1][part],
            candidate_kl=kls[0][part],
            incumbent_kl=kls[1][part],
            request_ids=[f"{prefix}-{i}" for i in range(part.start, part.stop)],
        )


def _latencies(window: PairedWindow, *, cand_ms: float = 5.0, inc_ms: float = 5.0) -> None:
    rng = np.random.default_rng(99)
    for _ in range(50):
        window.add_latency("candidate", float(rng.normal(cand_ms, 0.3)))
        window.add_latency("incumbent", float(rng.normal(inc_ms, 0.3)))


def _window(*, latencies: bool = True, **feed: Any) -> PairedWindow:
    """A fresh window fed by `_feed(**feed)`, with 50 latencies per version unless told not."""
    window = PairedWindow()
    _feed(window, **feed)
    if latencies:
        _latencies(window)
    return window


def _decide(window: PairedWindow, criteria: Criteria = CRITERIA, **kw: Any) -> Analysis:
    args: dict[str, Any] = {
        "min_samples": 500,
        "elapsed_seconds": 120.0,
        "min_seconds": 60.0,
        "max_seconds": 1800.0,
    }
    return analyse(window, criteria, **{**args, **kw})


def _check(analysis: Analysis, name: str) -> Any:
    (check,) = [c for c in analysis.checks if c.name == name]
    return check


# -- interval maths ------------------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_paired_interval_is_the_normal_interval_of_scipy_and_brute_force(confidence: float) -> None:
    rng = np.random.default_rng(1)
    cand = (rng.random(3000) < 0.95).astype(float)
    inc = (rng.random(3000) < 0.94).astype(float)
    got = paired_interval(cand, inc, confidence)
    d = cand.astype(float) - inc.astype(float)
    low, high = stats.norm.interval(confidence, loc=d.mean(), scale=stats.sem(d))
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12, abs=1e-15)
    # Brute force: the textbook sums, one row at a time.
    values = [float(a) - float(b) for a, b in zip(cand, inc, strict=True)]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    half = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(var / len(values))
    assert got == pytest.approx((mean, mean - half, mean + half), rel=1e-9)
    # Student t (ttest_rel) gives the same interval to < 0.1% of its width at this n.
    t_low, t_high = stats.ttest_rel(cand, inc).confidence_interval(confidence)
    assert abs(t_low - got.low) < 1e-3 * (got.high - got.low)
    assert abs(t_high - got.high) < 1e-3 * (got.high - got.low)


@pytest.mark.parametrize(("confidence", "rate", "shared"), [(0.95, 0.97, 0.7), (0.9, 0.8, 0.0)])
def test_agreement_interval_covers_an_equal_candidate_at_the_nominal_rate(
    confidence: float, rate: float, shared: float
) -> None:
    # 2000 simulated windows of a candidate equal to the incumbent in distribution: the true
    # difference is 0, so the interval must cover 0 in ~confidence of them (binomial sd ~0.005).
    covered = 0
    windows = 2000
    for seed in range(windows):
        w = PairedWindow(capacity=400)
        _feed(w, n=400, cand_agree=rate, inc_agree=rate, seed=seed, shared=shared, batch=400)
        teacher, cand, inc, _ = w.snapshot().ints
        iv = paired_interval(cand == teacher, inc == teacher, confidence)
        covered += iv.low <= 0.0 <= iv.high
    assert abs(covered / windows - confidence) < 0.02


def test_analysis_uses_the_paired_intervals_for_agreement_and_kl() -> None:
    w = _window(n=4000, cand_agree=0.96, inc_agree=0.97, seed=3, cand_kl=0.06)
    a = _decide(w)
    teacher, cand, inc, _ = w.snapshot().ints
    floats = w.snapshot().floats
    agree = _check(a, "agreement")
    assert agree.candidate == pytest.approx(np.mean(cand == teacher))
    assert agree.incumbent == pytest.approx(np.mean(inc == teacher))
    d = (cand == teacher).astype(float) - (inc == teacher).astype(float)
    expected = stats.norm.interval(0.95, loc=d.mean(), scale=stats.sem(d))
    assert (agree.low, agree.high) == pytest.approx(expected, rel=1e-9)
    assert agree.limit == -0.01
    kl = _check(a, "kl")
    t_low, t_high = stats.ttest_rel(floats[2], floats[3]).confidence_interval(0.95)
    assert kl.difference == pytest.approx(np.mean(floats[2] - floats[3]), rel=1e-12)
    assert (kl.low, kl.high) == pytest.approx((t_low, t_high), rel=1e-3)
    assert kl.limit == 0.02


@pytest.mark.parametrize(("kind", "classes"), [("logits", 10), ("probabilities", 4)])
def test_ece_figures_are_fidelitys_ece_checked_by_brute_force(kind: str, classes: int) -> None:
    rng = np.random.default_rng(classes)
    teacher = rng.normal(0, 3, (700, classes))
    versions = [teacher + rng.normal(0, s, teacher.shape) for s in (1.0, 2.0)]
    if kind == "probabilities":
        versions = [softmax(v, axis=1) for v in versions]
    (cand_top, cand_conf), (inc_top, inc_conf) = (fidelity.top1(v, kind) for v in versions)
    teacher_top = teacher.argmax(axis=1)
    w = PairedWindow()
    w.add_classification(
        teacher_top1=teacher_top,
        candidate_top1=cand_top,
        incumbent_top1=inc_top,
        candidate_conf=cand_conf,
        incumbent_conf=inc_conf,
        candidate_kl=np.zeros(700),
        incumbent_kl=np.zeros(700),
        request_ids=[f"{kind}-{i}" for i in range(700)],
    )
    ece = _check(_decide(w), "ece")
    probs = [v if kind == "probabilities" else softmax(v, axis=1) for v in versions]
    assert ece.candidate == pytest.approx(brute_force_ece(probs[0], teacher_top), abs=1e-12)
    assert ece.incumbent == pytest.approx(brute_force_ece(probs[1], teacher_top), abs=1e-12)
    assert ece.difference == pytest.approx(ece.candidate - ece.incumbent, abs=1e-15)


def _reference_ece(conf: np.ndarray, hit: np.ndarray) -> float:
    bins = np.minimum((conf * 15).astype(int), 14)
    gap = sum(abs(hit[bins == b].sum() - conf[bins == b].sum()) for b in range(15))
    return float(gap / len(conf))


@pytest.mark.parametrize("n", [400, 4 * BOOTSTRAP_BLOCKS])
def test_ece_bootstrap_interval_agrees_with_scipys_paired_bootstrap(n: int) -> None:
    rng = np.random.default_rng(n)
    conf = [rng.uniform(0.5, 1.0, n), rng.uniform(0.6, 1.0, n)]
    hit = [rng.random(n) < conf[0] - 0.05, rng.random(n) < conf[1]]
    ece_c, ece_i, iv = ece_difference(conf[0], hit[0], conf[1], hit[1], 0.95)
    assert ece_c == pytest.approx(_reference_ece(conf[0], hit[0]), abs=1e-12)
    assert ece_i == pytest.approx(_reference_ece(conf[1], hit[1]), abs=1e-12)
    ref = stats.bootstrap(
        (conf[0], hit[0], conf[1], hit[1]),
        lambda cc, ch, ic, ih: _reference_ece(cc, ch) - _reference_ece(ic, ih),
        paired=True,
        vectorized=False,
        n_resamples=2000,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    width = ref.high - ref.low
    # Monte Carlo error of the 400-resample endpoints is ~0.15 of the width's standard deviation.
    assert abs(iv.low - ref.low) < 0.1 * width
    assert abs(iv.high - ref.high) < 0.1 * width
    assert iv.low < iv.estimate < iv.high
    # The same rows for both versions: no difference, no uncertainty about it.
    same = ece_difference(conf[0], hit[0], conf[0], hit[0], 0.95)[2]
    assert same == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("n", [1, 2, 19, 20, 21, 99, 100, 101, 1000])
def test_p95_is_the_nearest_rank_percentile(n: int) -> None:
    x = np.random.default_rng(n).exponential(5.0, n)
    brute = sorted(x)[math.ceil(0.95 * n - 1e-9) - 1]
    assert p95_nearest_rank(x) == brute
    assert p95_nearest_rank(x) == np.percentile(x, 95, method="inverted_cdf")
    assert math.isnan(p95_nearest_rank([]))


# -- decisions -----------------------------------------------------------------------------------


def test_too_few_samples_wait_even_for_a_clearly_better_candidate() -> None:
    w = _window(n=100, cand_agree=0.99, inc_agree=0.6, seed=4)
    a = _decide(w, elapsed_seconds=600.0)
    assert _check(a, "agreement").outcome == "pass"
    assert a.decision == "wait"
    assert a.samples == 100
    assert "100 of 500 samples" in a.reason


def test_too_little_time_waits_even_with_enough_samples() -> None:
    w = _window(n=20000, cand_agree=0.97, inc_agree=0.97, seed=5)
    assert _decide(w).decision == "pass"
    a = _decide(w, elapsed_seconds=30.0)
    assert a.decision == "wait"
    assert "30 of 60 s" in a.reason


def test_a_better_candidate_within_the_noise_is_not_promoted() -> None:
    w = _window(n=300, cand_agree=0.92, inc_agree=0.91, seed=6, shared=0.0)
    a = _decide(w, min_samples=100)
    agree = _check(a, "agreement")
    assert agree.candidate > agree.incumbent
    assert agree.low < -CRITERIA.agreement_margin < agree.high
    assert agree.outcome == "wait"
    assert a.decision == "wait"
    assert "agreement" in a.reason


def test_a_clearly_worse_candidate_fails_on_agreement() -> None:
    w = _window(n=1000, cand_agree=0.6, inc_agree=0.97, seed=7, classes=4, prefix="tabular")
    a = _decide(w)
    assert a.decision == "fail"
    assert a.reason.startswith("agreement fail")
    assert "0.6" in a.reason


def test_an_equal_candidate_with_enough_samples_passes() -> None:
    w = _window(n=20000, cand_agree=0.97, inc_agree=0.97, seed=8)
    a = _decide(w)
    assert a.decision == "pass", a.reason
    names = [c.name for c in a.checks]
    assert names == ["agreement", "kl", "ece", "p95_latency"]
    assert all(c.outcome == "pass" for c in a.checks)


def test_higher_kl_fails_when_the_interval_clears_the_margin() -> None:
    w = _window(n=5000, cand_agree=0.97, inc_agree=0.97, seed=9, cand_kl=0.2)
    a = _decide(w)
    assert a.decision == "fail"
    assert a.reason.startswith("kl fail")


def test_past_max_seconds_while_waiting_is_inconclusive() -> None:
    few = _window(latencies=False, n=100, cand_agree=0.97, inc_agree=0.97, seed=10)
    a = _decide(few, elapsed_seconds=1800.0)
    assert a.decision == "fail"
    assert a.reason.startswith("inconclusive after 1800 s")
    noisy = _window(n=300, cand_agree=0.92, inc_agree=0.91, seed=6, shared=0.0)
    a = _decide(noisy, min_samples=100, elapsed_seconds=2000.0)
    assert a.decision == "fail"
    assert a.reason.startswith("inconclusive after 2000 s")
    assert "agreement" in a.reason


def test_latency_check_holds_p95_to_ratio_and_slack() -> None:
    w = _window(latencies=False, n=20000, cand_agree=0.97, inc_agree=0.97, seed=11)
    assert _check(_decide(w), "p95_latency").outcome == "wait"  # no latencies yet
    _latencies(w, cand_ms=9.0, inc_ms=5.0)  # 9 <= 5 * 1.5 + 2 (about)
    check = _check(_decide(w), "p95_latency")
    cand, inc = w.snapshot().candidate_ms, w.snapshot().incumbent_ms
    assert check.candidate == np.percentile(cand, 95, method="inverted_cdf")
    assert check.incumbent == np.percentile(inc, 95, method="inverted_cdf")
    assert check.limit == pytest.approx(check.incumbent * 0.5 + 2.0)
    assert check.outcome == ("pass" if check.difference <= check.limit else "fail")
    slow = PairedWindow()
    _feed(slow, n=20000, cand_agree=0.97, inc_agree=0.97, seed=11)
    _latencies(slow, cand_ms=20.0, inc_ms=5.0)
    a = _decide(slow)
    assert a.decision == "fail"
    assert a.reason.startswith("p95_latency fail")


def test_label_ece_needs_min_labels_and_joins_by_request_id() -> None:
    criteria = Criteria(min_labels=50)
    w = _window(latencies=False, n=120, cand_agree=0.9, inc_agree=0.9, seed=12, prefix="text")
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 10, 120)
    for i in range(49):
        assert w.attach_label(f"text-{i}", int(labels[i]))
    assert w.labelled == 49
    assert "label_ece" not in [c.name for c in _decide(w, criteria, min_samples=10).checks]
    assert w.attach_label("text-49", int(labels[49]))
    check = _check(_decide(w, criteria, min_samples=10), "label_ece")
    _, cand, inc, _ = w.snapshot().ints
    conf = w.snapshot().floats
    for side, top, figure in ((0, cand, check.candidate), (1, inc, check.incumbent)):
        # Probability rows whose top class and confidence are the window's, for brute force.
        probs = np.zeros((50, 10))
        probs[np.arange(50), top[:50]] = conf[side, :50]
        probs[np.arange(50), (top[:50] + 1) % 10] = 1 - conf[side, :50]
        assert figure == pytest.approx(brute_force_ece(probs, labels[:50]), abs=1e-12)
    assert check.limit == criteria.label_ece_margin


def test_attach_label_refuses_unknown_evicted_and_mismatched_ids() -> None:
    w = PairedWindow(capacity=10)
    w.add_classification(
        teacher_top1=[1, 2, 3],
        candidate_top1=[1, 2, 0],
        incumbent_top1=[1, 2, 3],
        candidate_conf=[0.9, 0.8, 0.7],
        incumbent_conf=[0.9, 0.8, 0.7],
        candidate_kl=[0.1, 0.1, 0.1],
        incumbent_kl=[0.1, 0.1, 0.1],
        request_ids="multi-row",
    )
    assert not w.attach_label("multi-row", 1)  # three rows need three labels
    assert not w.attach_label("multi-row", [1, -1, 2])
    assert not w.attach_label("never-seen", 1)
    assert w.attach_label("multi-row", [1, 2, 3])
    assert w.labelled == 3
    _feed(w, n=8, cand_agree=0.9, inc_agree=0.9, seed=13, prefix="next")
    assert w.samples == 10
    assert not w.attach_label("multi-row", [1, 2, 3])  # its first row has left the ring
    assert w.attach_label("next-0", 1)  # rows 3..10 of 11 are held
    assert w.attach_label("next-7", 4)
    w.clear()
    assert not w.attach_label("next-7", 4)


def test_regression_windows_check_the_paired_error_difference() -> None:
    rng = np.random.default_rng(14)
    good, bad = PairedWindow(), PairedWindow(kind="regression")
    for w, extra in ((good, 0.0), (bad, 0.5)):
        err = rng.exponential(1.0, 4000)
        w.add_regression(
            candidate_abs_error=err + extra + rng.normal(0, 0.01, 4000).clip(0),
            incumbent_abs_error=err,
            request_ids=[f"house-{i}" for i in range(4000)],
        )
        _latencies(w)
        assert not w.attach_label("house-1", 1)
    a = _decide(good)
    assert [c.name for c in a.checks] == ["abs_error", "p95_latency"]
    check = _check(a, "abs_error")
    floats = good.snapshot().floats
    expected = stats.norm.interval(
        0.95, loc=np.mean(floats[0] - floats[1]), scale=stats.sem(floats[0] - floats[1])
    )
    assert (check.low, check.high) == pytest.approx(expected, rel=1e-9)
    assert check.limit == pytest.approx(0.05 * floats[1].mean())
    assert a.decision == "pass"
    assert _decide(bad).reason.startswith("abs_error fail")
    with pytest.raises(ValueError, match="regression window"):
        _feed(bad, n=1, cand_agree=1.0, inc_agree=1.0, seed=0)


def test_the_ring_is_bounded_and_clear_forgets_everything() -> None:
    w = PairedWindow(capacity=1000)
    size = w.nbytes
    _feed(w, n=3000, cand_agree=0.9, inc_agree=0.9, seed=15)
    _latencies(w)
    assert w.samples == 1000
    assert w.nbytes == size
    # The newest 1000 rows are the ones held.
    fresh = PairedWindow(capacity=5000)
    _feed(fresh, n=3000, cand_agree=0.9, inc_agree=0.9, seed=15)
    np.testing.assert_array_equal(w.snapshot().ints, fresh.snapshot().ints[:, 2000:])
    tracemalloc.start()
    try:
        # Once the ids held were added under tracing, 40,000 more rows (megabytes if their ids
        # were kept) add at most the id index's slack: evicted rows' ids are forgotten.
        _feed(w, n=5000, cand_agree=0.9, inc_agree=0.9, seed=16, prefix="warm")
        before = tracemalloc.get_traced_memory()[0]
        _feed(w, n=40000, cand_agree=0.9, inc_agree=0.9, seed=17, prefix="more")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024
    w.clear()
    assert w.samples == 0
    assert w.labelled == 0
    snap = w.snapshot()
    assert snap.ints.shape == (4, 0)
    assert snap.candidate_ms.size == snap.incumbent_ms.size == 0
    assert _decide(w).decision == "wait"


def test_appends_reject_ragged_columns() -> None:
    w = PairedWindow()
    with pytest.raises(ValueError, match="same number of rows"):
        w.add_regression(candidate_abs_error=[1.0], incumbent_abs_error=[1.0, 2.0], request_ids="x")
    with pytest.raises(ValueError, match="2 request ids for 1 rows"):
        w.add_regression(
            candidate_abs_error=[1.0], incumbent_abs_error=[1.0], request_ids=["a", "b"]
        )
    assert w.samples == 0


def test_analysis_json_has_no_nans() -> None:
    a = _decide(PairedWindow())
    doc = a.to_json()
    assert doc["decision"] == "wait"
    assert doc["checks"][0]["name"] == "agreement"
    assert doc["checks"][0]["difference"] is None


# -- criteria and steps --------------------------------------------------------------------------


def test_criteria_validate() -> None:
    assert Criteria.model_validate({"confidence": 0.9}).confidence == 0.9
    with pytest.raises(ValidationError):
        Criteria(confidence=1.5)
    with pytest.raises(ValidationError):
        Criteria.model_validate({"agreement_margn": 0.1})
    with pytest.raises(ValidationError):
        Criteria(kl_margin_nats=-1)


def test_parse_steps_shorthand_and_defaults() -> None:
    steps = parse_steps(
        ["dark", 5, {"weight": 25, "min_samples": 100}, 100],
        {"min_samples": 800, "min_seconds": 30, "max_seconds": 600, "steps": "ignored"},
    )
    assert [s.weight for s in steps] == [0, 5, 25, 100]
    assert [s.label for s in steps] == ["dark", "5%", "25%", "100%"]
    assert [s.min_samples for s in steps] == [800, 800, 100, 800]
    assert {s.min_seconds for s in steps} == {30.0}
    assert {s.max_seconds for s in steps} == {600.0}
    plain = parse_steps([100])
    assert plain == [StepSpec(weight=100, min_samples=500, min_seconds=60, max_seconds=1800)]
    assert parse_steps(steps, None) == steps  # parsed steps pass through
    assert parse_steps([{"weight": "dark"}, 100])[0].weight == 0


class _Settings:
    min_samples = 50
    min_seconds = 5.0
    max_seconds = None


def test_parse_steps_reads_defaults_from_an_object() -> None:
    (step,) = parse_steps([100], _Settings())
    assert (step.min_samples, step.min_seconds, step.max_seconds) == (50, 5.0, 1800.0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([5, 5, 100], r"steps\[1\]: weight 5 is not above the previous step's 5"),
        (["dark", 50, 25, 100], r"steps\[2\]: weight 25 is not above .* 50"),
        (["dark", 25], "the last step must have weight 100"),
        ([5, 150], r"steps\[1\]: weight 150 is outside 0..100"),
        ([-1, 100], r"steps\[0\]: weight -1 is outside 0..100"),
        ([{"weight": 5, "min_sample": 3}, 100], r"steps\[0\]: unknown key\(s\) min_sample"),
        ([{"min_samples": 3}, 100], r"steps\[0\]: a step object needs a weight"),
        (["fast", 100], r"steps\[0\]: 'fast' is not a step"),
        ([True, 100], r"steps\[0\]: True is not a step"),
        ([{"weight": 5.5}, 100], r"steps\[0\]: weight 5.5 is not an integer"),
        ([{"weight": 5, "min_seconds": 900, "max_seconds": 600}, 100], r"steps\[0\]: max_seconds"),
        ([{"weight": 5, "min_samples": 0}, 100], r"steps\[0\]: min_samples"),
        ([], "must not be empty"),
        ("dark, 5, 100", "must be a list"),
    ],
)
def test_parse_steps_errors_name_the_step(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_steps(raw, {})


def test_parse_steps_rejects_bad_defaults() -> None:
    with pytest.raises(ValueError, match="step defaults: min_samples"):
        parse_steps([100], {"min_samples": -5})
