"""Every Prometheus instrument kdgate exports, built on an injected registry.

Names, types and labels are the contract in DESIGN.md section 3; docs/metrics.md lists them with
PromQL. Fidelity is exported as counters and histograms (never pre-averaged gauges) so Prometheus
can compute it over any window and sum it exactly across replicas.

Tests build `Metrics(CollectorRegistry())` and read values back with
`registry.get_sample_value(...)`; nothing here touches the global registry.

The request path journals its bookkeeping and settles it in bulk (service/inference.py):
`Metrics.before_collect` holds the hooks that settle it, run at the start of every collect of
the registry, so whoever reads a value (a scrape, a test) reads one that includes every answered
request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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

CALIBRATION_BINS = 15


class BulkHistogram(Histogram):
    """A Histogram that also takes many observations at once: `observe_many(values)`.

    The same buckets and count as calling `observe` on each value, and the same sum up to
    rounding (tests/unit/test_metrics.py compares them), at ~0.1 us per value instead of ~3. It
    updates the instrument's own bucket values, as `Histogram.observe` does.
    """

    def observe_many(self, amounts: Sequence[float] | np.ndarray) -> None:
        """Observe every value of `amounts`."""
        values = np.asarray(amounts, dtype=np.float64).reshape(-1)
        if not values.size:
            return
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]  # a labelled parent
        # observe() counts a value in the first bucket whose upper bound is >= it: that is
        # searchsorted's "left" side. NaN sorts past +Inf and, like observe(), lands in none.
        index = np.searchsorted(self._upper_bounds, values, side="left")
        counts = np.bincount(index, minlength=len(self._upper_bounds))
        self._sum.inc(sum(values.tolist()))  # left to right, as observe() adds them
        for bucket, count in zip(self._buckets, counts.tolist(), strict=False):
            if count:
                bucket.inc(count)


class _BeforeCollect(Collector):
    """Registered first: runs the hooks before any instrument of the registry is collected."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def describe(self) -> Iterable[Metric]:
        return ()  # exports nothing; describe() keeps the registry from collecting at register

    def collect(self) -> Iterable[Metric]:
        for hook in self.hooks:
            hook()
        return ()


class Metrics:
    """The kdgate instruments, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        before = _BeforeCollect()
        registry.register(before)
        # Hooks run at the start of every collect of `registry` (on the collecting thread).
        self.before_collect = before.hooks
        self.requests = Counter(
            "kdgate_requests",
            "Inference requests served.",
            ["model", "version", "protocol", "code"],
            registry=registry,
        )
        self.request_duration = BulkHistogram(
            "kdgate_request_duration_seconds",
            "Server-side inference request latency in seconds.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.shadow = Counter(
            "kdgate_shadow",
            "Shadow samples by outcome: compared, dropped (queue full), teacher_error.",
            ["model", "outcome"],
            registry=registry,
        )
        self.shadow_queue_depth = Gauge(
            "kdgate_shadow_queue_depth",
            "Shadow samples waiting for the teacher.",
            ["model"],
            registry=registry,
        )
        self.fidelity_samples = Counter(
            "kdgate_fidelity_samples",
            "Student/teacher pairs compared.",
            ["model", "version"],
            registry=registry,
        )
        self.fidelity_agreements = Counter(
            "kdgate_fidelity_agreements",
            "Student/teacher pairs with the same top-1 class.",
            ["model", "version"],
            registry=registry,
        )
        self.fidelity_kl = BulkHistogram(
            "kdgate_fidelity_kl_divergence_nats",
            "KL(teacher || student) per compared sample, in nats.",
            ["model", "version"],
            buckets=KL_BUCKETS_NATS,
            registry=registry,
        )
        calibration_labels = ["model", "version", "reference", "bin"]
        self.calibration_samples = Counter(
            "kdgate_calibration_samples",
            "Samples per top-1 confidence bin (15 equal-width bins over [0, 1]).",
            calibration_labels,
            registry=registry,
        )
        self.calibration_confidence = Counter(
            "kdgate_calibration_confidence",
            "Sum of top-1 confidence per confidence bin.",
            calibration_labels,
            registry=registry,
        )
        self.calibration_correct = Counter(
            "kdgate_calibration_correct",
            "Samples per confidence bin whose top-1 class matched the reference.",
            calibration_labels,
            registry=registry,
        )
        self.input_drift_share = Gauge(
            "kdgate_input_drift_share",
            "Share of input columns Evidently finds drifted against the reference sample.",
            ["model"],
            registry=registry,
        )
        self.slo_breached = Gauge(
            "kdgate_slo_breached",
            "1 while the in-process monitor sees the SLO breached, else 0.",
            ["model", "slo"],
            registry=registry,
        )
        self.retrain_requests = Counter(
            "kdgate_retrain_requests",
            "Retrain webhook deliveries by outcome: delivered, retried, failed.",
            ["model", "outcome"],
            registry=registry,
        )
        self.traffic_weight = Gauge(
            "kdgate_traffic_weight",
            "Percent (0-100) of a model's split-routed requests sent to a student version.",
            ["model", "version"],
            registry=registry,
        )
        # Micro-batcher (service/batching.py): observed once per batched run, never per request.
        self.batch_rows = Histogram(
            "kdgate_batch_rows",
            "Rows per micro-batched session run (requests that ran inline are not counted).",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.batch_wait = Histogram(
            "kdgate_batch_wait_seconds",
            "Seconds the first request of a micro-batch waited for its run (the batch's longest "
            "wait).",
            ["model", "version"],
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1),
            registry=registry,
        )
        self.teacher_breaker_state = Gauge(
            "kdgate_teacher_breaker_state",
            "Circuit breaker of a model's teacher calls: 0 closed, 1 half-open, 2 open.",
            ["model"],
            registry=registry,
        )
