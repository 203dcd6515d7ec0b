"""LatencyWindow: P95 of the recent requests, from the exported histogram."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from prometheus_client import CollectorRegistry

from kdgate.monitoring.latency_window import LatencyWindow
from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS, Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def brute_force_p95(latencies: list[float]) -> float:
    """histogram_quantile by hand: the bucket of rank 0.95 * n, linear inside it."""
    bounds = [0.0, *LATENCY_BUCKETS_SECONDS]
    counts = [sum(1 for x in latencies if lo < x <= hi) for lo, hi in pairwise(bounds)]
    rank, seen = 0.95 * len(latencies), 0
    for i, c in enumerate(counts):
        if seen + c >= rank:
            return bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - seen) / c
        seen += c
    raise AssertionError


def test_p95_over_versions_and_window() -> None:
    clock = Clock()
    metrics = Metrics(CollectorRegistry())
    window = LatencyWindow(metrics, window_seconds=60, bucket_seconds=10, clock=clock)
    assert window.p95("m") is None
    rng = np.random.default_rng(0)
    old = list(rng.uniform(0.5, 0.9, 100))  # slow requests that will leave the window
    for x in old:
        metrics.request_duration.labels("m", "1").observe(x)
    window.sample()
    clock.now += 120
    recent = list(rng.exponential(0.002, 500))
    for i, x in enumerate(recent):
        metrics.request_duration.labels("m", "1" if i % 2 else "2").observe(x)
    window.sample()
    p95 = window.p95("m")
    assert p95 is not None
    assert abs(p95 - brute_force_p95(recent)) < 1e-12
    assert window.p95("other") is None
