"""Every Prometheus instrument kdgate exports, built on an injected registry.

Names, types and labels are the contract in DESIGN.md section 3; docs/metrics.md lists them with
PromQL. Fidelity is exported as counters and histograms (never pre-averaged gauges) so Prometheus
can compute it over any window and sum it exactly across replicas.

Tests build `Metrics(CollectorRegistry())` and read values back with
`registry.get_sample_value(...)`; nothing here touches the global registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class Metrics:
    """The kdgate instruments, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "kdgate_requests",
            "Inference requests served.",
            ["model", "version", "protocol", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
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
        self.fidelity_kl = Histogram(
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
