"""Merging workers' metric families: against one registry that saw every observation."""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kdgate.service.exposition import Families, families_of, merge

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def instruments(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    counter = Counter("kdgate_requests", "requests", ["code"], registry=registry)
    histogram = Histogram(
        "kdgate_request_duration_seconds", "latency", ["model"], buckets=BUCKETS, registry=registry
    )
    return counter, histogram


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_counters_and_histograms_split_over_workers_equal_one_process_that_saw_all() -> None:
    rng = np.random.default_rng(7)
    workers = [CollectorRegistry() for _ in range(3)]
    whole = CollectorRegistry()
    per_worker = [instruments(r) for r in workers]
    all_counter, all_histogram = instruments(whole)
    for _ in range(1000):
        counter, histogram = per_worker[rng.integers(3)]
        code = str(rng.choice(["200", "400"]))
        seconds = float(rng.exponential(0.05))
        for c, h in ((counter, histogram), (all_counter, all_histogram)):
            c.labels(code).inc()
            h.labels("digits").observe(seconds)
    merged = merge([families_of(r) for r in workers])
    got = samples(generate_latest(Families(merged)))  # type: ignore[arg-type]
    want = samples(generate_latest(whole))
    assert got.keys() == want.keys()
    for series, value in want.items():
        assert math.isclose(got[series], value, rel_tol=1e-12), series


def test_created_is_the_earliest_and_gauges_follow_their_mode() -> None:
    registries = [CollectorRegistry() for _ in range(2)]
    for value, registry in zip((3.0, 5.0), registries, strict=True):
        Gauge("kdgate_shadow_queue_depth", "q", ["model"], registry=registry).labels("d").set(value)
        Gauge("kdgate_input_drift_share", "d", ["model"], registry=registry).labels("d").set(value)
        Gauge("kdgate_teacher_breaker_state", "b", ["model"], registry=registry).labels("d").set(
            value
        )
        Gauge("process_start_time_seconds", "t", registry=registry).set(value * 100)
        Counter("kdgate_things", "t", registry=registry).inc()
    found = [families_of(r) for r in registries]
    merged = {
        (name, tuple(labels.items())): float(value)
        for family in merge(found, leader=0)
        for name, labels, value in family["samples"]
    }
    assert merged[("kdgate_shadow_queue_depth", (("model", "d"),))] == 8.0  # sum
    assert merged[("kdgate_input_drift_share", (("model", "d"),))] == 3.0  # the leader's
    assert merged[("kdgate_teacher_breaker_state", (("model", "d"),))] == 5.0  # max
    assert merged[("process_start_time_seconds", ())] == 300.0  # the oldest worker
    assert merged[("kdgate_things_total", ())] == 2.0
    created = [
        float(value)
        for families in found
        for family in families
        for name, _, value in family["samples"]
        if name == "kdgate_things_created"
    ]
    assert merged[("kdgate_things_created", ())] == min(created)
    # Without the leader's families, a leader gauge falls back to the highest value.
    no_leader = merge(found, leader=None)
    (drift,) = [f for f in no_leader if f["name"] == "kdgate_input_drift_share"]
    assert float(drift["samples"][0][2]) == 5.0


def test_values_survive_the_trip_exactly_nan_and_infinities_included() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("kdgate_value", "v", ["which"], registry=registry)
    values = {"third": 1 / 3, "nan": math.nan, "inf": math.inf, "tiny": 5e-324}
    for which, value in values.items():
        gauge.labels(which).set(value)
    (family,) = merge([families_of(registry)])
    back = {labels["which"]: float(value) for _, labels, value in family["samples"]}
    assert back["third"] == 1 / 3 and back["tiny"] == 5e-324 and back["inf"] == math.inf
    assert math.isnan(back["nan"])
