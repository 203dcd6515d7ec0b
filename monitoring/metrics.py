"""Every Prometheus metric kdgate exports, built on an injected registry.

Names, types and labels are the contract in DESIGN.md section 3; docs/metrics.md lists them with
PromQL. Fidelity is exported as counters and histograms (never pre-averaged gauges) so Prometheus
can compute it over any window and sum it exactly across replicas.

Two kinds of series, both exported through public prometheus_client API only:

- The high-rate aggregates (requests, request latency, KL per compared sample) are numpy arrays
  owned by kdgate: `CounterFamily` and `HistogramFamily`, updated in bulk (one `np.searchsorted`
  + `np.bincount` per batch instead of one locked `.inc()` per value) and exported by a custom
  collector (`Export`, client_python's documented way) that yields `CounterMetricFamily` and
  `HistogramMetricFamily`. `Export(families, before=settle)` runs `settle` at the start of its
  collect: a read barrier, so a scrape sees every request answered before it began.
- The rest (gauges, low-rate counters) are ordinary prometheus_client instruments on a registry
  private to `Metrics`, re-exported by its collector without their `_created` series (kdgate
  exports none, so dashboards and rules never see them; no process-global switch is involved).

Tests build `Metrics(CollectorRegistry())` and read values back with
`registry.get_sample_value(...)`; nothing here touches the global registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Server-side latency of a ~100 us request must be resolvable: the default buckets start at 5 ms.
LATENCY_BUCKETS_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# KL(teacher || student) per sample, in nats: a healthy distilled pair sits around 0.01-0.05,
# a broken one at 1 or more.
KL_BUCKETS_NATS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# Regression outputs: |student - teacher| per predicted value, in the output's own unit, and
# that error relative to |teacher| (0.01 = 1 %).
REGRESSION_ABS_BUCKETS = (
    0.0001, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 100.0,
)  # fmt: skip
REGRESSION_REL_BUCKETS = (
    0.0001, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip

CALIBRATION_BINS = 15


def le_label(bound: float) -> str:
    """The `le` label prometheus_client writes for a histogram bucket bound (0.1 -> "0.1")."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def bucket_counts(upper_bounds: NDArray[np.float64], values: ArrayLike) -> NDArray[np.int64]:
    """Per-bucket (not cumulative) counts of `values`; the last bucket is +Inf.

    A value counts in the first bucket whose upper bound is >= it, as `Histogram.observe` does:
    searchsorted's "left" side. NaN sorts past +Inf and, as with `observe`, lands in none.
    """
    index = np.searchsorted(upper_bounds, np.asarray(values, dtype=np.float64), side="left")
    counts: NDArray[np.int64] = np.bincount(index, minlength=len(upper_bounds) + 1)
    return counts[: len(upper_bounds)]


class CounterSeries:
    """One labelled series of a `CounterFamily`."""

    __slots__ = ("_family", "value")

    def __init__(self, family: CounterFamily) -> None:
        self._family = family
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (>= 0)."""
        if amount < 0:
            raise ValueError("counters only go up")
        with self._family.lock:
            self.value += amount


class CounterFamily:
    """A labelled counter kept by kdgate (exported by `Export` as `<name>_total`)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.lock = threading.Lock()
        self._series: dict[tuple[str, ...], CounterSeries] = {}

    def labels(self, *values: str) -> CounterSeries:
        """The series of these label values, created (at 0) on first use."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            with self.lock:
                series = self._series.setdefault(values, CounterSeries(self))
        return series

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self.lock:
            for values, series in self._series.items():
                family.add_metric(values, series.value)
        return family


class HistogramSeries:
    """One labelled series of a `HistogramFamily`: bucket counts (last: +Inf) and a sum."""

    __slots__ = ("_family", "counts", "sum")

    def __init__(self, family: HistogramFamily) -> None:
        self._family = family
        self.counts = np.zeros(len(family.upper_bounds), dtype=np.int64)
        self.sum = 0.0

    def observe_many(self, values: ArrayLike) -> None:
        """Observe every value (same buckets and count as `Histogram.observe` on each)."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size:
            self.add(bucket_counts(self._family.upper_bounds, v), float(v.sum()))

    def add(self, counts: NDArray[np.int64], total: float) -> None:
        """Add per-bucket counts (as `bucket_counts` returns them) and their values' sum."""
        with self._family.lock:
            self.counts += counts
            self.sum += total


class HistogramFamily:
    """A labelled histogram kept by kdgate in numpy (exported by `Export`)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.upper_bounds = np.array([*buckets, np.inf], dtype=np.float64)
        self._le = [le_label(b) for b in self.upper_bounds.tolist()]
        self.lock = threading.Lock()
        self._series: dict[tuple[str, ...], HistogramSeries] = {}

    def labels(self, *values: str) -> HistogramSeries:
        """The series of these label values, created (empty) on first use."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            with self.lock:
                series = self._series.setdefault(values, HistogramSeries(self))
        return series

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self.lock:
            rows = [(v, s.counts.cumsum().tolist(), s.sum) for v, s in self._series.items()]
        for values, cumulative, total in rows:
            family.add_metric(values, list(zip(self._le, cumulative, strict=True)), total)
        return family


Family = CounterFamily | HistogramFamily


class Export(Collector):
    """Exports kdgate-owned families; `before` runs first on every collect (a read barrier)."""

    def __init__(
        self, families: Sequence[Family], *, before: Callable[[], None] | None = None
    ) -> None:
        self._families = tuple(families)
        self._before = before

    def describe(self) -> Iterable[Metric]:
        # Names only: lets the registry refuse a duplicate name without collecting.
        return [Metric(f.name, f.documentation, _kind(f)) for f in self._families]

    def collect(self) -> Iterable[Metric]:
        if self._before is not None:
            self._before()
        return [f.collect() for f in self._families]


def _kind(family: Family) -> str:
    return "counter" if isinstance(family, CounterFamily) else "histogram"


class _WithoutCreated(Collector):
    """Re-exports a registry's metrics minus their `_created` samples."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return [Metric(m.name, m.documentation, m.type, m.unit) for m in self._source.collect()]

    def collect(self) -> Iterable[Metric]:
        for metric in self._source.collect():
            kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            kept.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield kept


def request_families() -> tuple[CounterFamily, HistogramFamily]:
    """`kdgate_requests_total` and `kdgate_request_duration_seconds` (fed by the request log)."""
    return (
        CounterFamily(
            "kdgate_requests_total",
            "Inference requests served.",
            ["model", "version", "protocol", "code"],
        ),
        HistogramFamily(
            "kdgate_request_duration_seconds",
            "Server-side inference request latency in seconds.",
            ["model", "version"],
            LATENCY_BUCKETS_SECONDS,
        ),
    )


class Metrics:
    """The kdgate instruments other than the request families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # prometheus_client instruments live on a private registry that `_WithoutCreated`
        # re-exports on `registry` (see the module doc).
        own = CollectorRegistry(auto_describe=True)
        self.fidelity_kl = HistogramFamily(
            "kdgate_fidelity_kl_divergence_nats",
            "KL(teacher || student) per compared sample, in nats.",
            ["model", "version"],
            KL_BUCKETS_NATS,
        )
        self.regression_abs_error = HistogramFamily(
            "kdgate_regression_abs_error",
            "|student - teacher| per compared regression value, in the output's unit.",
            ["model", "version"],
            REGRESSION_ABS_BUCKETS,
        )
        self.regression_rel_error = HistogramFamily(
            "kdgate_regression_rel_error",
            "|student - teacher| / |teacher| per compared regression value.",
            ["model", "version"],
            REGRESSION_REL_BUCKETS,
        )
        self.comparison_enabled = Gauge(
            "kdgate_comparison_enabled",
            "1 while a model's shadowed requests are compared with its teacher, 0 when they "
            "cannot be (no teacher, or outputs that cannot be compared; the log says why).",
            ["model"],
            registry=own,
        )
        self.shadow = Counter(
            "kdgate_shadow",
            "Shadow samples by outcome: compared, dropped (queue full), teacher_error.",
            ["model", "outcome"],
            registry=own,
        )
        self.shadow_queue_depth = Gauge(
            "kdgate_shadow_queue_depth",
            "Shadow samples waiting for the teacher.",
            ["model"],
            registry=own,
        )
        self.fidelity_samples = Counter(
            "kdgate_fidelity_samples",
            "Student/teacher pairs compared.",
            ["model", "version"],
            registry=own,
        )
        self.fidelity_agreements = Counter(
            "kdgate_fidelity_agreements",
            "Student/teacher pairs with the same top-1 class.",
            ["model", "version"],
            registry=own,
        )
        calibration_labels = ["model", "version", "reference", "bin"]
        self.calibration_samples = Counter(
            "kdgate_calibration_samples",
            "Samples per top-1 confidence bin (15 equal-width bins over [0, 1]).",
            calibration_labels,
            registry=own,
        )
        self.calibration_confidence = Counter(
            "kdgate_calibration_confidence",
            "Sum of top-1 confidence per confidence bin.",
            calibration_labels,
            registry=own,
        )
        self.calibration_correct = Counter(
            "kdgate_calibration_correct",
            "Samples per confidence bin whose top-1 class matched the reference.",
            calibration_labels,
            registry=own,
        )
        self.input_drift_share = Gauge(
            "kdgate_input_drift_share",
            "Share of input columns Evidently finds drifted against the reference sample.",
            ["model"],
            registry=own,
        )
        self.slo_breached = Gauge(
            "kdgate_slo_breached",
            "1 while the in-process monitor sees the SLO breached, else 0.",
            ["model", "slo"],
            registry=own,
        )
        self.retrain_requests = Counter(
            "kdgate_retrain_requests",
            "Retrain webhook deliveries by outcome: delivered, retried, failed.",
            ["model", "outcome"],
            registry=own,
        )
        self.traffic_weight = Gauge(
            "kdgate_traffic_weight",
            "Percent (0-100) of a model's split-routed requests sent to a student version.",
            ["model", "version"],
            registry=own,
        )
        # Micro-batcher (service/batching.py): observed once per batched run, never per request.
        self.batch_rows = Histogram(
            "kdgate_batch_rows",
            "Rows per micro-batched session run (requests that ran inline are not counted).",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=own,
        )
        self.batch_wait = Histogram(
            "kdgate_batch_wait_seconds",
            "Seconds the first request of a micro-batch waited for its run (the batch's longest "
            "wait).",
            ["model", "version"],
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1),
            registry=own,
        )
        self.teacher_breaker_state = Gauge(
            "kdgate_teacher_breaker_state",
            "Circuit breaker of a model's teacher calls: 0 closed, 1 half-open, 2 open.",
            ["model"],
            registry=own,
        )
        registry.register(
            Export([self.fidelity_kl, self.regression_abs_error, self.regression_rel_error])
        )
        registry.register(_WithoutCreated(own))
