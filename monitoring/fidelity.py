"""Teacher-student fidelity maths: plain numpy, no I/O, no state.

Every function takes a batch (rows are samples, columns are classes) and returns per-sample
arrays or per-bin sums, so callers can aggregate exactly (Prometheus counters, sliding windows)
instead of averaging averages. Computation is in float64 whatever the input dtype.

Calibration bins: `CALIBRATION_BINS` equal-width bins over [0, 1]. A top-1 confidence `c` goes to
bin `min(floor(c * 15), 14)`: bins are left-closed, right-open `[k/15, (k+1)/15)`, except the last,
which is closed so that a confidence of exactly 1.0 lands in bin 14. The floor is taken in float64,
so a confidence within one ulp of an edge may fall on either side of it; the exported counters use
the same rule, so in-process and Prometheus ECE agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

CALIBRATION_BINS = 15

# What a model's scores output holds (the card's `output_kind`): logits are turned into
# probabilities with a softmax; probabilities are used as they are (clipped at `PROBABILITY_EPS`
# and renormalised, never softmaxed again); regression values are compared by their error.
OutputKind = Literal["logits", "probabilities", "regression"]
PROBABILITY_EPS = 1e-12

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


def _rows(x: ArrayLike) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected a [N, C] array with C >= 1, got shape {a.shape}")
    return a


def log_softmax(logits: ArrayLike) -> FloatArray:
    """Row-wise log-softmax of `logits` [N, C] (stable: the row maximum is subtracted first)."""
    z = _rows(logits)
    z = z - z.max(axis=1, keepdims=True)
    out: FloatArray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def softmax(logits: ArrayLike) -> FloatArray:
    """Row-wise softmax of `logits` [N, C]: probabilities, each row sums to 1."""
    return np.exp(log_softmax(logits))


def log_probabilities(scores: ArrayLike, kind: OutputKind = "logits") -> FloatArray:
    """Row-wise log-probabilities of class scores [N, C] of `kind`: log-softmax of logits, or
    the log of probabilities clipped to [PROBABILITY_EPS, 1] and renormalised per row."""
    if kind == "logits":
        return log_softmax(scores)
    if kind == "probabilities":
        return np.log(_clip_renormalise(scores, PROBABILITY_EPS))
    raise ValueError(f"{kind} outputs have no class probabilities")


def top1(scores: ArrayLike, kind: OutputKind = "logits") -> tuple[IntArray, FloatArray]:
    """Per row of class scores [N, C] of `kind`: the top-1 class index and its probability (the
    confidence, in [0, 1])."""
    return _top1(log_probabilities(scores, kind))


def agreement(student_logits: ArrayLike, teacher_logits: ArrayLike) -> BoolArray:
    """Per row: True where student and teacher have the same top-1 class (first max on ties)."""
    s, t = _pair(student_logits, teacher_logits)
    return np.asarray(s.argmax(axis=1) == t.argmax(axis=1))


def kl_from_logits(teacher_logits: ArrayLike, student_logits: ArrayLike) -> FloatArray:
    """KL(teacher || student) per row, in nats, from logits via log-softmax (no epsilon).

    Exact up to rounding; values that rounding pushes below zero are clipped to 0.
    """
    t, s = _pair(teacher_logits, student_logits)
    log_p = log_softmax(t)
    log_q = log_softmax(s)
    kl: FloatArray = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=1), 0.0)
    return kl


def kl_from_probs(
    teacher_probs: ArrayLike, student_probs: ArrayLike, *, eps: float = 1e-12
) -> FloatArray:
    """KL(teacher || student) per row, in nats, from probabilities.

    Both sides are clipped to [eps, 1] and renormalised per row first, so a zero in the student
    (which would make KL infinite) costs about `-p * log(eps)` instead.
    """
    p = _clip_renormalise(teacher_probs, eps)
    q = _clip_renormalise(student_probs, eps)
    _pair(p, q)
    kl: FloatArray = np.maximum((p * (np.log(p) - np.log(q))).sum(axis=1), 0.0)
    return kl


def js_distance(p_probs: ArrayLike, q_probs: ArrayLike) -> FloatArray:
    """Jensen-Shannon distance per row (natural log, so in [0, sqrt(ln 2)]).

    Rows are normalised to sum 1 (as scipy.spatial.distance.jensenshannon does); zeros are
    allowed: 0 * log 0 counts as 0.
    """
    p, q = _pair(p_probs, q_probs)
    if (p < 0).any() or (q < 0).any():
        raise ValueError("probabilities must be non-negative")
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    m = (p + q) / 2.0
    divergence = (_rel_entr(p, m).sum(axis=1) + _rel_entr(q, m).sum(axis=1)) / 2.0
    distance: FloatArray = np.sqrt(np.maximum(divergence, 0.0))
    return distance


@dataclass(frozen=True, slots=True)
class Calibration:
    """Per-bin calibration sums for a set of samples, each array of length `CALIBRATION_BINS`.

    `samples`: samples whose top-1 confidence fell in the bin; `confidence`: sum of those
    confidences; `correct`: how many of them had the reference class as top-1.
    """

    samples: IntArray
    confidence: FloatArray
    correct: IntArray

    def __add__(self, other: Calibration) -> Calibration:
        return Calibration(
            self.samples + other.samples,
            self.confidence + other.confidence,
            self.correct + other.correct,
        )

    @property
    def total(self) -> int:
        """Number of samples over all bins."""
        return int(self.samples.sum())

    @property
    def accuracy(self) -> float:
        """Share of samples whose top-1 matched the reference; NaN with no samples."""
        total = self.total
        return float(self.correct.sum()) / total if total else float("nan")


def bin_index(confidence: ArrayLike) -> IntArray:
    """Calibration bin per confidence: `min(floor(c * 15), 14)` (see the module docstring)."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.size and (not np.isfinite(c).all() or c.min() < 0.0 or c.max() > 1.0):
        raise ValueError("confidences must be finite and within [0, 1]")
    return np.minimum(np.floor(c * CALIBRATION_BINS), CALIBRATION_BINS - 1).astype(np.int64)


def calibration(confidence: ArrayLike, correct: ArrayLike) -> Calibration:
    """Per-bin sums of samples, confidence and correct over `confidence` [N] and `correct` [N]."""
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=bool).reshape(-1)
    if c.shape != hit.shape:
        raise ValueError(f"confidence {c.shape} and correct {hit.shape} differ in length")
    return _binned(bin_index(c), c, hit)


def calibration_against(
    scores: ArrayLike, reference: ArrayLike, kind: OutputKind = "logits"
) -> Calibration:
    """Calibration of class scores [N, C] of `kind` against reference classes [N] (teacher top-1
    or labels)."""
    prediction, confidence = top1(scores, kind)
    ref = np.asarray(reference).reshape(-1)
    if ref.shape != prediction.shape:
        raise ValueError(f"{prediction.shape[0]} rows but {ref.shape[0]} reference classes")
    return calibration(confidence, prediction == ref)


def empty_calibration() -> Calibration:
    """Calibration sums of no samples."""
    return Calibration(
        np.zeros(CALIBRATION_BINS, np.int64),
        np.zeros(CALIBRATION_BINS, np.float64),
        np.zeros(CALIBRATION_BINS, np.int64),
    )


def ece(cal: Calibration) -> float:
    """Expected calibration error: `sum_bin |correct - confidence| / sum_bin samples`.

    Equal to the usual `sum_bin (n_bin / N) * |accuracy_bin - mean_confidence_bin|`, and to the
    PromQL expression over the three calibration counters. NaN with no samples.
    """
    total = cal.total
    if total == 0:
        return float("nan")
    return float(np.abs(cal.correct - cal.confidence).sum() / total)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A batch of student/teacher pairs compared: per-row agreement and KL, and the student's
    calibration against the teacher's top-1."""

    agree: BoolArray
    kl: FloatArray
    calibration: Calibration


def compare(
    student_scores: ArrayLike,
    teacher_scores: ArrayLike,
    *,
    student_kind: OutputKind = "logits",
    teacher_kind: OutputKind = "logits",
) -> Comparison:
    """Everything the shadow path measures for one batch of class scores [N, C] from both
    models; each side's scores are logits or probabilities as its `*_kind` says."""
    # One log-probability per side feeds all three figures: this runs per shadow batch, on the
    # event loop, where each extra numpy call on a small batch costs about a microsecond.
    s, t = _pair(student_scores, teacher_scores)
    log_q, log_p = log_probabilities(s, student_kind), log_probabilities(t, teacher_kind)
    prediction, confidence = _top1(log_q)
    agree = np.asarray(prediction == log_p.argmax(axis=1))
    kl: FloatArray = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=1), 0.0)
    bins = np.minimum(confidence * CALIBRATION_BINS, CALIBRATION_BINS - 1).astype(np.int64)
    return Comparison(agree=agree, kl=kl, calibration=_binned(bins, confidence, agree))


@dataclass(frozen=True, slots=True)
class RegressionErrors:
    """Per predicted value of a regression batch: `absolute` |student - teacher| and `relative`
    |student - teacher| / |teacher| (+inf where the teacher predicts exactly 0 and the student
    does not; 0 where both do)."""

    absolute: FloatArray
    relative: FloatArray


def regression_errors(student: ArrayLike, teacher: ArrayLike) -> RegressionErrors:
    """Absolute and relative error of the student against the teacher, one per value (every
    element of the [N, ...] outputs, flattened)."""
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    if s.shape != t.shape:
        raise ValueError(f"shapes differ: {s.shape} vs {t.shape}")
    absolute = np.abs(s - t).reshape(-1)
    scale = np.abs(t).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(absolute == 0, 0.0, absolute / scale)
    return RegressionErrors(absolute=absolute, relative=relative)


def _top1(log_probs: FloatArray) -> tuple[IntArray, FloatArray]:
    prediction = log_probs.argmax(axis=1).astype(np.int64)
    confidence: FloatArray = np.exp(log_probs.max(axis=1))
    return prediction, confidence


def _binned(bins: IntArray, confidence: FloatArray, hit: BoolArray) -> Calibration:
    return Calibration(
        samples=np.bincount(bins, minlength=CALIBRATION_BINS).astype(np.int64),
        confidence=np.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS).astype(
            np.float64
        ),
        correct=np.bincount(bins, weights=hit, minlength=CALIBRATION_BINS).astype(np.int64),
    )


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[FloatArray, FloatArray]:
    x, y = _rows(a), _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    return x, y


def _clip_renormalise(probs: ArrayLike, eps: float) -> FloatArray:
    p = np.clip(_rows(probs), eps, 1.0)
    out: FloatArray = p / p.sum(axis=1, keepdims=True)
    return out


def _rel_entr(p: FloatArray, m: FloatArray) -> FloatArray:
    # p * log(p / m) with 0 * log 0 = 0; m > 0 wherever p > 0, so no division by zero.
    positive = p > 0
    safe_p = np.where(positive, p, 1.0)
    safe_m = np.where(positive, m, 1.0)
    return np.where(positive, p * (np.log(safe_p) - np.log(safe_m)), 0.0)
