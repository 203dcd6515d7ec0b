"""Fidelity of one model, recorded as increments of the DESIGN.md instruments.

`FidelityRecorder(metrics, model)` is the one place where compared batches (shadow path) and
labelled predictions (feedback API) become Prometheus counters:

- `record_comparison(version, student_logits, teacher_logits)`: per row, one increment of
  `kdgate_fidelity_samples_total`, agreements where the top-1 classes match, one observation of
  `kdgate_fidelity_kl_divergence_nats`, and the student's calibration against the teacher's top-1
  in `kdgate_calibration_*_total{reference="teacher"}`.
- `record_labels(version, logits, labels)`: calibration against ground truth in
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
    calibration_against,
    compare,
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


class FidelityRecorder:
    """Records the fidelity of model `model` (all its versions) on `metrics`."""

    def __init__(self, metrics: Metrics, model: str, *, window: RecentWindow | None = None) -> None:
        self.metrics = metrics
        self.model = model
        self.window = window
        self._calibration: dict[tuple[str, str], _CalibrationChildren] = {}
        self._fidelity: dict[str, _FidelityChildren] = {}

    def bind(self, version: str) -> None:
        """Create every series of `version` now (both references), so they export as 0."""
        self._fidelity_children(version)
        for reference in REFERENCES:
            self._calibration_children(version, reference)

    def record_comparison(
        self, version: str, student_logits: ArrayLike, teacher_logits: ArrayLike
    ) -> Comparison:
        """Record a compared batch (student and teacher logits, [N, C] each) of `version`."""
        result = compare(student_logits, teacher_logits)
        children = self._fidelity_children(version)
        children.samples.inc(len(result.agree))
        children.agreements.inc(int(np.count_nonzero(result.agree)))
        children.kl.observe_many(result.kl)
        self._add_calibration(version, "teacher", result.calibration)
        if self.window is not None:
            self.window.add_comparison(self.model, version, result)
        return result

    def record_labels(self, version: str, logits: ArrayLike, labels: ArrayLike) -> Calibration:
        """Record `logits` [N, C] of `version` (or TEACHER_VERSION) against class indices [N]."""
        cal = calibration_against(logits, labels)
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
