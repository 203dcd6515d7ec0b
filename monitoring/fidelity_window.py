"""The recent-window fidelity summary behind `GET /v1/fidelity`.

`FidelityWindow` keeps, per version, one `BucketedWindow` of the additive figures the recorder
produces — compared pairs, agreements, KL sum, per-bin calibration against the teacher and
against labels — and `summary()` turns their totals into ratios. Ratios with no samples behind
them are None (JSON null), never NaN. Feed it through `FidelityRecorder(..., window=...)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kdgate.monitoring.fidelity import CALIBRATION_BINS, Calibration, Comparison, ece
from kdgate.monitoring.recorder import TEACHER_VERSION
from kdgate.monitoring.window import BucketedWindow

# Vector layout: [pairs, agreements, kl_sum] then calibration vs teacher, then vs labels, each
# as samples[15], confidence[15], correct[15].
_PAIRS, _AGREEMENTS, _KL_SUM = 0, 1, 2
_TEACHER_CAL = 3
_LABEL_CAL = _TEACHER_CAL + 3 * CALIBRATION_BINS
_WIDTH = _LABEL_CAL + 3 * CALIBRATION_BINS


class FidelityWindow:
    """Sliding-window fidelity of one model, per version, over `window_seconds`."""

    def __init__(
        self,
        *,
        window_seconds: float = 300.0,
        bucket_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = float(window_seconds)
        self._bucket_seconds = bucket_seconds
        self._clock = clock
        self._versions: dict[str, BucketedWindow] = {}

    def add_comparison(self, version: str, comparison: Comparison) -> None:
        """Add a compared batch of `version`."""
        v = np.zeros(_WIDTH)
        v[_PAIRS] = len(comparison.agree)
        v[_AGREEMENTS] = np.count_nonzero(comparison.agree)
        v[_KL_SUM] = comparison.kl.sum()
        _put(v, _TEACHER_CAL, comparison.calibration)
        self._window(version).add(v)

    def add_labels(self, version: str, cal: Calibration) -> None:
        """Add label calibration of `version` (TEACHER_VERSION for the teacher)."""
        v = np.zeros(_WIDTH)
        _put(v, _LABEL_CAL, cal)
        self._window(version).add(v)

    def summary(self, version: str | None = None) -> dict[str, Any]:
        """Window figures for one student version, or all student versions together (None).

        Keys: window_seconds; samples (compared pairs), agreement, mean_kl (nats), ece_teacher;
        label_samples, label_accuracy, ece_label; teacher_label_samples, teacher_label_accuracy,
        teacher_ece_label (the teacher against the same labels, where the request was shadowed).
        """
        students = (
            [version]
            if version is not None
            else [v for v in self._versions if v != TEACHER_VERSION]
        )
        total = np.zeros(_WIDTH)
        for v in students:
            if v in self._versions:
                total += self._versions[v].total()
        teacher = self._versions.get(TEACHER_VERSION)
        teacher_label = _take(teacher.total() if teacher else np.zeros(_WIDTH), _LABEL_CAL)
        pairs = int(total[_PAIRS])
        label = _take(total, _LABEL_CAL)
        return {
            "window_seconds": self.window_seconds,
            "samples": pairs,
            "agreement": _ratio(total[_AGREEMENTS], pairs),
            "mean_kl": _ratio(total[_KL_SUM], pairs),
            "ece_teacher": _ece(_take(total, _TEACHER_CAL)),
            "label_samples": label.total,
            "label_accuracy": _accuracy(label),
            "ece_label": _ece(label),
            "teacher_label_samples": teacher_label.total,
            "teacher_label_accuracy": _accuracy(teacher_label),
            "teacher_ece_label": _ece(teacher_label),
        }

    def _window(self, version: str) -> BucketedWindow:
        w = self._versions.get(version)
        if w is None:
            w = BucketedWindow(
                _WIDTH,
                window_seconds=self.window_seconds,
                bucket_seconds=self._bucket_seconds,
                clock=self._clock,
            )
            self._versions[version] = w
        return w


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
