"""monitoring/metrics.py: kdgate-owned families export what prometheus_client instruments would,
through a public collector with a read barrier, and no `_created` series."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kdgate.monitoring.metrics import (
    LATENCY_BUCKETS_SECONDS,
    CounterFamily,
    Export,
    HistogramFamily,
    Metrics,
)


def _histograms() -> tuple[Histogram, HistogramFamily, CollectorRegistry, CollectorRegistry]:
    one, many = CollectorRegistry(), CollectorRegistry()
    labels = ["model"]
    each = Histogram("h", "h", labels, buckets=LATENCY_BUCKETS_SECONDS, registry=one)
    bulk = HistogramFamily("h", "h", labels, LATENCY_BUCKETS_SECONDS)
    many.register(Export([bulk]))
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


def test_the_barrier_runs_before_every_collect_of_the_families() -> None:
    registry = CollectorRegistry()
    family = HistogramFamily("h", "h", ["model"], LATENCY_BUCKETS_SECONDS)
    pending = [0.001, 0.002]

    def settle() -> None:
        family.labels("m").observe_many(pending)
        pending.clear()

    registry.register(Export([family], before=settle))
    assert registry.get_sample_value("h_count", {"model": "m"}) == 2
    assert b"h_count" in generate_latest(registry)


def test_counter_family_exports_a_counter_and_refuses_to_go_down() -> None:
    registry = CollectorRegistry()
    family = CounterFamily("c_total", "c", ["code"])
    registry.register(Export([family]))
    family.labels("200").inc(3)
    family.labels("200").inc()
    assert registry.get_sample_value("c_total", {"code": "200"}) == 4
    reference = CollectorRegistry()
    Counter("c", "c", ["code"], registry=reference).labels("200").inc(4)
    want = [x for x in generate_latest(reference).decode().splitlines() if "_created" not in x]
    assert generate_latest(registry).decode().splitlines() == want
    with pytest.raises(ValueError, match="up"):
        family.labels("200").inc(-1)


def test_no_created_series_are_exported() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.shadow.labels("digits", "compared").inc()
    metrics.fidelity_samples.labels("digits", "1").inc(2)
    metrics.fidelity_kl.labels("digits", "1").observe_many([0.01])
    text = generate_latest(metrics.registry).decode()
    assert "kdgate_shadow_total" in text and "kdgate_fidelity_kl_divergence_nats_sum" in text
    assert "_created" not in text
    assert (
        metrics.registry.get_sample_value(
            "kdgate_fidelity_samples_total", {"model": "digits", "version": "1"}
        )
        == 2
    )
