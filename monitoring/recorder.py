"""Fidelity of one model, recorded as increments of the DESIGN.md instruments.

`FidelityRecorder(metrics, model)` is the one place where compared batches (shadow path) and
labelled predictions (feedback API) become Prometheus counters:

Each side's scores are read as its `output_kind` says (`student_kind`, `teacher_kind`: logits are
softmaxed, probabilities used as they are), so a logits student can follow a probabilities
teacher.

- `record(version, student_scores, teacher_scores)`, for classes `record_comparison`: per row,
  one increment of `kdgate_fidelity_samples_total`, agreements where the top-1 classes match, one
  observation of `kdgate_fidelity_kl_divergence_nats`, and the student's calibration against the
  teacher's top-1 in `kdgate_calibration_*_total{reference="teacher"}`. For a regression pair
  (both kinds "regression"), instead one observation per predicted value of
  `kdgate_regression_abs_error` and `kdgate_regression_rel_error`: no agreement, KL or
  calibration exists for it.
- `record_labels(version, scores, labels)`: calibration against ground truth in
  `kdgate_calibration_*_total{reference="label"}`. The teacher's own label calibration is recorded
  under `version=TEACHER_VERSION` ("teacher"), so the student-teacher accuracy delta is a PromQL
  difference between two series of one metric; student versions must not be named "teacher".

Label children are bound once per (version, reference) and cached, so a batch costs O(rows + bins)
counter operations and no label lookups; `bind(version)` creates a version's series up front so
they are exported at 0 before the first sample (and `increase()` sees the first one).
If a `RecentWindow` is given, the same figures also go to it (`GET /v1/fidelity`, `/v1/slo`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client.metrics import Counter

from kdgate.monitoring.fidelity import (
    CALIBRATION_BINS,
    Calibration,
    Comparison,
    OutputKind,
    RegressionErrors,
    calibration_against,
    compare,
    empty_calibration,
    regression_errors,
)
from kdgate.monitoring.metrics import HistogramSeries, Metrics
from kdgate.monitoring.recent import TEACHER_VERSION, RecentWindow

__all__ = ["TEACHER_VERSION", "FidelityRecorder"]
REFERENCES = ("teacher", "label")
BIN_LABELS = tuple(str(b) for b in range(CALIBRATION_BINS))


@dataclass(frozen=True, slots=True)
class _CalibrationChildren:
    samples: tuple[Counter, ...]
    confidence: tuple[Counter, ...]
    correct: tuple[Counter, ...]


@dataclass(frozen=True, slots=True)
class _FidelityChildren:
    samples: Counter
    agreements: Counter
    kl: HistogramSeries


@dataclass(frozen=True, slots=True)
class _RegressionChildren:
    absolute: HistogramSeries
    relative: HistogramSeries


class FidelityRecorder:
    """Records the fidelity of model `model` (all its versions) on `metrics`.

    `student_kind` and `teacher_kind` are the `output_kind` of the student's and the teacher's
    scores; both "regression" or neither (the monitoring runtime does not compare a mixed pair).
    """

    def __init__(
        self,
        metrics: Metrics,
        model: str,
        *,
        window: RecentWindow | None = None,
        student_kind: OutputKind = "logits",
        teacher_kind: OutputKind = "logits",
    ) -> None:
        if (student_kind == "regression") != (teacher_kind == "regression"):
            raise ValueError(f"cannot compare {student_kind} with {teacher_kind}")
        self.metrics = metrics
        self.model = model
        self.window = window
        self.student_kind: OutputKind = student_kind
        self.teacher_kind: OutputKind = teacher_kind
        self._calibration: dict[tuple[str, str], _CalibrationChildren] = {}
        self._fidelity: dict[str, _FidelityChildren] = {}
        self._regression: dict[str, _RegressionChildren] = {}

    @property
    def regression(self) -> bool:
        """Whether the pair is compared by regression error (no classes)."""
        return self.student_kind == "regression"

    def bind(self, version: str) -> None:
        """Create every series of `version` now (both references), so they export as 0."""
        if self.regression:
            self._regression_children(version)
            return
        self._fidelity_children(version)
        for reference in REFERENCES:
            self._calibration_children(version, reference)

    def record_regression(
        self, version: str, student_values: ArrayLike, teacher_values: ArrayLike
    ) -> RegressionErrors:
        """Record a compared regression batch (same shape [N, ...] on both sides) of `version`."""
        errors = regression_errors(student_values, teacher_values)
        children = self._regression_children(version)
        children.absolute.observe_many(errors.absolute)
        children.relative.observe_many(errors.relative)
        return errors

    def record(self, version: str, student_scores: ArrayLike, teacher_scores: ArrayLike) -> None:
        """Record a compared batch of `version`, by class (`record_comparison`) or by regression
        error (`record_regression`) as the pair's kinds say."""
        if self.regression:
            self.record_regression(version, student_scores, teacher_scores)
        else:
            self.record_comparison(version, student_scores, teacher_scores)

    def record_comparison(
        self, version: str, student_scores: ArrayLike, teacher_scores: ArrayLike
    ) -> Comparison:
        """Record a compared batch of class scores ([N, C] from each side, read as their kinds
        say) of `version`."""
        result = compare(
            student_scores,
            teacher_scores,
            student_kind=self.student_kind,
            teacher_kind=self.teacher_kind,
        )
        children = self._fidelity_children(version)
        children.samples.inc(len(result.agree))
        children.agreements.inc(int(np.count_nonzero(result.agree)))
        children.kl.observe_many(result.kl)
        self._add_calibration(version, "teacher", result.calibration)
        if self.window is not None:
            self.window.add_comparison(self.model, version, result)
        return result

    def record_labels(self, version: str, scores: ArrayLike, labels: ArrayLike) -> Calibration:
        """Record class scores [N, C] of `version` (or TEACHER_VERSION, read as the teacher's
        kind) against class indices [N]. A regression pair records nothing (it has no
        calibration) and returns empty sums."""
        if self.regression:
            return empty_calibration()
        kind = self.teacher_kind if version == TEACHER_VERSION else self.student_kind
        cal = calibration_against(scores, labels, kind)
        self._add_calibration(version, "label", cal)
        if self.window is not None:
            self.window.add_labels(self.model, version, cal)
        return cal

    def _add_calibration(self, version: str, reference: str, cal: Calibration) -> None:
        children = self._calibration_children(version, reference)
        for b in np.flatnonzero(cal.samples).tolist():
            children.samples[b].inc(int(cal.samples[b]))
            children.confidence[b].inc(float(cal.confidence[b]))
            if cal.correct[b]:
                children.correct[b].inc(int(cal.correct[b]))

    def _fidelity_children(self, version: str) -> _FidelityChildren:
        children = self._fidelity.get(version)
        if children is None:
            m = self.metrics
            children = _FidelityChildren(
                samples=m.fidelity_samples.labels(self.model, version),
                agreements=m.fidelity_agreements.labels(self.model, version),
                kl=m.fidelity_kl.labels(self.model, version),
            )
            self._fidelity[version] = children
        return children

    def _regression_children(self, version: str) -> _RegressionChildren:
        children = self._regression.get(version)
        if children is None:
            m = self.metrics
            children = _RegressionChildren(
                absolute=m.regression_abs_error.labels(self.model, version),
                relative=m.regression_rel_error.labels(self.model, version),
            )
            self._regression[version] = children
        return children

    def _calibration_children(self, version: str, reference: str) -> _CalibrationChildren:
        key = (version, reference)
        children = self._calibration.get(key)
        if children is None:
            m = self.metrics

            def bins(counter: Counter) -> tuple[Counter, ...]:
                return tuple(counter.labels(self.model, version, reference, b) for b in BIN_LABELS)

            children = _CalibrationChildren(
                samples=bins(m.calibration_samples),
                confidence=bins(m.calibration_confidence),
                correct=bins(m.calibration_correct),
            )
            self._calibration[key] = children
        return children
