"""service/request_metrics.py: request counts and latency from settled batches, exported as a
prometheus_client Counter and Histogram would export them, and fed to the recent window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS
from kdgate.monitoring.recent import RecentWindow
from kdgate.service.request_log import Served
from kdgate.service.request_metrics import RequestMetrics


@dataclass(frozen=True)
class FakeVariant:  # what the consumer reads of a Variant
    model: str
    version: str


def served(variant: FakeVariant | None, status: int, seconds: float, model: str = "m") -> Served:
    return Served("v2", model, variant, status, 10.0, "id", {}, None, None, 10.0 + seconds)  # type: ignore[arg-type]


def test_exports_what_prometheus_client_instruments_would() -> None:
    rng = np.random.default_rng(1)
    one, two = FakeVariant("m", "1"), FakeVariant("m", "2")
    rows = [
        served(one if i % 3 else two, 200 if i % 5 else 400, float(x))
        for i, x in enumerate(rng.exponential(0.003, 300))
    ]
    ours = CollectorRegistry()
    metrics = RequestMetrics(["m"], window=RecentWindow())
    ours.register(metrics.export(before=lambda: None))
    metrics.consume(rows[:100])
    metrics.consume(rows[100:])

    reference = CollectorRegistry()
    counter = Counter(
        "kdgate_requests", "Inference requests served.",
        ["model", "version", "protocol", "code"], registry=reference,
    )  # fmt: skip
    histogram = Histogram(
        "kdgate_request_duration_seconds", "Server-side inference request latency in seconds.",
        ["model", "version"], buckets=LATENCY_BUCKETS_SECONDS, registry=reference,
    )  # fmt: skip
    for row in rows:
        assert row.variant is not None
        counter.labels("m", row.variant.version, "v2", str(row.status)).inc()
        histogram.labels("m", row.variant.version).observe(row.answered - row.started)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode().splitlines()
        return sorted(x for x in text if "_created" not in x and "_sum" not in x)

    assert lines(ours) == lines(reference)
    for version in ("1", "2"):
        labels = {"model": "m", "version": version}
        got = ours.get_sample_value("kdgate_request_duration_seconds_sum", labels)
        want = reference.get_sample_value("kdgate_request_duration_seconds_sum", labels)
        assert got is not None and want is not None and abs(got - want) < 1e-12
    assert metrics.window is not None
    assert metrics.window.figures("m").requests == 300


def test_bound_versions_export_zeros_and_unrouted_requests_have_no_version() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(["m"])
    registry.register(metrics.export(before=lambda: None))
    metrics.bind("m", "1")
    labels = {"model": "m", "version": "1", "protocol": "v1", "code": "503"}
    assert registry.get_sample_value("kdgate_requests_total", labels) == 0
    metrics.consume([served(None, 404, 0.001, model="m"), served(None, 404, 0.001, model="cats")])
    for model in ("m", ""):
        labels = {"model": model, "version": "", "protocol": "v2", "code": "404"}
        assert registry.get_sample_value("kdgate_requests_total", labels) == 1
