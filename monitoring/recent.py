"""The recent window: one per-version view that `/v1/fidelity`, `/v1/slo` and the monitor read.

`RecentWindow` keeps, per (model, version), one `BucketedWindow` of everything additive that the
figures are made of, fed directly by their producers:

    FidelityRecorder.record_comparison -> add_comparison  (pairs, agreements, KL sum, calibration)
    FidelityRecorder.record_labels     -> add_labels      (label calibration; "teacher" version)
    request log settle                 -> add_latency     (request counts per latency bucket)
    drift job                          -> set_drift       (share of drifted columns, rows)

`figures(model, version=None)` turns the window's totals into the figures (`Figures`) for one
version or all student versions together. Because every reader asks this one object for the same
window, the fidelity endpoint and the SLO monitor agree by construction. Ratios with no samples
behind them are None (JSON null), never NaN; P95 is PromQL's `histogram_quantile` over the
window's latency buckets.

Thread-safe: the request log may settle on a scrape's thread, the drift job reports from a worker
thread; one lock guards the windows (each operation is O(buckets * width) numpy).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from kdgate.monitoring.fidelity import CALIBRATION_BINS, Calibration, Comparison, ece
from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS
from kdgate.monitoring.window import BucketedWindow

TEACHER_VERSION = "teacher"

# Vector layout: [pairs, agreements, kl_sum], calibration vs teacher, calibration vs labels (each
# samples[15], confidence[15], correct[15]), then requests per latency bucket (last: +Inf).
_PAIRS, _AGREEMENTS, _KL_SUM = 0, 1, 2
_TEACHER_CAL = 3
_LABEL_CAL = _TEACHER_CAL + 3 * CALIBRATION_BINS
_LATENCY = _LABEL_CAL + 3 * CALIBRATION_BINS
_LATENCY_WIDTH = len(LATENCY_BUCKETS_SECONDS) + 1
_WIDTH = _LATENCY + _LATENCY_WIDTH


def histogram_quantile(q: float, upper_bounds: Sequence[float], counts: npt.ArrayLike) -> float:
    """Prometheus `histogram_quantile` on non-cumulative bucket `counts` (last bucket is +Inf).

    Linear interpolation inside the bucket holding the rank, as PromQL does, so the in-process
    P95 equals the one Prometheus computes from the same buckets. NaN when there are no samples.
    """
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64))
    total = float(cumulative[-1]) if len(cumulative) else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    index = int(np.searchsorted(cumulative, rank, side="left"))
    if index >= len(upper_bounds):  # rank falls in +Inf: PromQL returns the last finite bound
        return float(upper_bounds[-1])
    lower = 0.0 if index == 0 else float(upper_bounds[index - 1])
    below = 0.0 if index == 0 else float(cumulative[index - 1])
    in_bucket = float(cumulative[index]) - below
    if in_bucket <= 0:
        return float(upper_bounds[index])
    return lower + (float(upper_bounds[index]) - lower) * (rank - below) / in_bucket


@dataclass(frozen=True)
class Figures:
    """What the window holds for one version, or all student versions of a model.

    samples: compared student/teacher pairs; agreement (top-1), mean_kl (nats), ece_teacher;
    label_samples, label_accuracy, ece_label: the student against feedback labels;
    teacher_label_*: the teacher against the same labels; requests and p95_latency_seconds.
    """

    samples: int
    agreement: float | None
    mean_kl: float | None
    ece_teacher: float | None
    label_samples: int
    label_accuracy: float | None
    ece_label: float | None
    teacher_label_samples: int
    teacher_label_accuracy: float | None
    teacher_ece_label: float | None
    requests: int
    p95_latency_seconds: float | None


@dataclass(frozen=True)
class Drift:
    """The latest drift result of a model: when (window clock), share, rows compared."""

    at: float
    share: float
    rows: int


class RecentWindow:
    """Per (model, version) sliding windows over `window_seconds` (see the module doc)."""

    def __init__(
        self,
        *,
        window_seconds: float = 300.0,
        bucket_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = float(window_seconds)
        self.bucket_seconds = float(bucket_seconds)
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], BucketedWindow] = {}
        self._drift: dict[str, Drift] = {}

    # -- producers ----------------------------------------------------------------------------

    def add_comparison(self, model: str, version: str, comparison: Comparison) -> None:
        """A compared batch of `version`."""
        v = np.zeros(_WIDTH)
        v[_PAIRS] = len(comparison.agree)
        v[_AGREEMENTS] = np.count_nonzero(comparison.agree)
        v[_KL_SUM] = comparison.kl.sum()
        _put(v, _TEACHER_CAL, comparison.calibration)
        self._add(model, version, v)

    def add_labels(self, model: str, version: str, cal: Calibration) -> None:
        """Label calibration of `version` (TEACHER_VERSION for the teacher)."""
        v = np.zeros(_WIDTH)
        _put(v, _LABEL_CAL, cal)
        self._add(model, version, v)

    def add_latency(self, model: str, version: str, counts: npt.ArrayLike) -> None:
        """Requests per `LATENCY_BUCKETS_SECONDS` bucket, then +Inf (not cumulative)."""
        v = np.zeros(_WIDTH)
        v[_LATENCY:] = counts
        self._add(model, version, v)

    def set_drift(self, model: str, share: float, rows: int) -> None:
        """The result of a drift run (any thread)."""
        with self._lock:
            self._drift[model] = Drift(self.clock(), share, rows)

    # -- readers ------------------------------------------------------------------------------

    def figures(self, model: str, version: str | None = None) -> Figures:
        """The window's figures for one student version, or all of them together (None)."""
        with self._lock:
            total = np.zeros(_WIDTH)
            teacher = np.zeros(_WIDTH)
            for (m, v), window in self._windows.items():
                if m != model:
                    continue
                if v == TEACHER_VERSION:
                    teacher += window.total()
                elif version is None or v == version:
                    total += window.total()
        pairs = int(total[_PAIRS])
        label, teacher_label = _take(total, _LABEL_CAL), _take(teacher, _LABEL_CAL)
        latency = total[_LATENCY:]
        requests = int(latency.sum())
        p95 = histogram_quantile(0.95, LATENCY_BUCKETS_SECONDS, latency) if requests else None
        return Figures(
            samples=pairs,
            agreement=_ratio(total[_AGREEMENTS], pairs),
            mean_kl=_ratio(total[_KL_SUM], pairs),
            ece_teacher=_ece(_take(total, _TEACHER_CAL)),
            label_samples=label.total,
            label_accuracy=_accuracy(label),
            ece_label=_ece(label),
            teacher_label_samples=teacher_label.total,
            teacher_label_accuracy=_accuracy(teacher_label),
            teacher_ece_label=_ece(teacher_label),
            requests=requests,
            p95_latency_seconds=p95,
        )

    def drift(self, model: str) -> Drift | None:
        """The latest drift result of `model` if it is not older than the window."""
        with self._lock:
            found = self._drift.get(model)
        if found is None or self.clock() - found.at > self.window_seconds:
            return None
        return found

    def _add(self, model: str, version: str, vector: NDArray[np.float64]) -> None:
        with self._lock:
            window = self._windows.get((model, version))
            if window is None:
                window = self._windows[(model, version)] = BucketedWindow(
                    _WIDTH,
                    window_seconds=self.window_seconds,
                    bucket_seconds=self.bucket_seconds,
                    clock=self.clock,
                )
            window.add(vector)


def _put(v: NDArray[np.float64], at: int, cal: Calibration) -> None:
    n = CALIBRATION_BINS
    v[at : at + n] = cal.samples
    v[at + n : at + 2 * n] = cal.confidence
    v[at + 2 * n : at + 3 * n] = cal.correct


def _take(v: NDArray[np.float64], at: int) -> Calibration:
    n = CALIBRATION_BINS
    return Calibration(
        samples=np.rint(v[at : at + n]).astype(np.int64),
        confidence=v[at + n : at + 2 * n].copy(),
        correct=np.rint(v[at + 2 * n : at + 3 * n]).astype(np.int64),
    )


def _ratio(numerator: float, denominator: int) -> float | None:
    return float(numerator) / denominator if denominator else None


def _ece(cal: Calibration) -> float | None:
    return ece(cal) if cal.total else None


def _accuracy(cal: Calibration) -> float | None:
    return cal.accuracy if cal.total else None
