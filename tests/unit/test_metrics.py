"""monitoring/metrics.py: bulk histogram observations, and the hooks run before a collect."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS, BulkHistogram, Metrics


def _histograms() -> tuple[BulkHistogram, BulkHistogram, CollectorRegistry, CollectorRegistry]:
    one, many = CollectorRegistry(), CollectorRegistry()
    labels = ["model"]
    each = BulkHistogram("h", "h", labels, buckets=LATENCY_BUCKETS_SECONDS, registry=one)
    bulk = BulkHistogram("h", "h", labels, buckets=LATENCY_BUCKETS_SECONDS, registry=many)
    return each, bulk, one, many


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(0, 20),
            st.sampled_from([*LATENCY_BUCKETS_SECONDS, 0.0, math.inf, -1.0, 1e-9]),
        ),
        max_size=50,
    )
)
def test_observe_many_exports_what_observe_per_value_does(values: list[float]) -> None:
    each, bulk, one, many = _histograms()
    child = each.labels("m")
    for value in values:
        child.observe(value)
    bulk.labels("m").observe_many(values)
    assert _samples(many, "_bucket") == _samples(one, "_bucket")
    assert _samples(many, "_count") == _samples(one, "_count")
    # One addition of the values' sum, not one per value: equal up to rounding.
    got = many.get_sample_value("h_sum", {"model": "m"})
    want = one.get_sample_value("h_sum", {"model": "m"})
    assert got is not None and want is not None
    assert got == want or math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15)


def _samples(registry: CollectorRegistry, suffix: str) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith(f"h{suffix}")
    ]


def test_observe_many_counts_bucket_bounds_like_observe() -> None:
    _, bulk, _, registry = _histograms()
    bulk.labels("m").observe_many([0.0001, 0.0001000001, 0.00025])
    bucket = "h_bucket"
    assert registry.get_sample_value(bucket, {"model": "m", "le": "0.0001"}) == 1
    assert registry.get_sample_value(bucket, {"model": "m", "le": "0.00025"}) == 3
    assert registry.get_sample_value("h_count", {"model": "m"}) == 3


def test_hooks_run_before_every_collect() -> None:
    metrics = Metrics(CollectorRegistry())
    child = metrics.request_duration.labels("digits", "1")
    pending = [0.001, 0.002]

    def settle() -> None:
        child.observe_many(pending)
        pending.clear()

    metrics.before_collect.append(settle)
    labels = {"model": "digits", "version": "1"}
    assert metrics.registry.get_sample_value("kdgate_request_duration_seconds_count", labels) == 2
    assert b"kdgate_request_duration_seconds_count" in generate_latest(metrics.registry)
