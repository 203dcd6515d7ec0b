"""Several workers' metrics as one host's: families as plain data, and their exact merge.

    local = families_of(registry)                    # this worker, as JSON-able data
    merged = merge([local, *siblings], leader=i)      # one family list for the host
    generate_latest(Families(merged))                 # the Prometheus text, as usual

Counters, histograms and summaries are summed per sample name and label set, so
`kdgate_requests_total` and every histogram bucket of the host are the sums of the workers'
(exact: each request is counted by the one worker that served it). A `_created` sample keeps
the earliest. Gauges have no meaningful sum in general, so each has a mode (`GAUGE_MODES`):

    sum      amounts held by each worker (queue depths, memory, descriptors)
    max      "is any worker ...", constant info gauges, limits (the default for a gauge not listed)
    min      process_start_time_seconds: when the oldest worker started
    leader   state only the leader computes (input drift share) or acts on (SLO breached);
             the highest value when the leader's exposition is missing

Values travel as `repr(float)` strings: exact, and NaN and infinities survive JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

Mode = Literal["sum", "max", "min", "leader"]
Family = dict[str, Any]  # {"name", "type", "help", "unit", "samples": [[name, labels, value]]}

GAUGE_MODES: dict[str, Mode] = {
    "kdgate_shadow_queue_depth": "sum",
    "process_resident_memory_bytes": "sum",
    "process_virtual_memory_bytes": "sum",
    "process_open_fds": "sum",
    "process_start_time_seconds": "min",
    "kdgate_input_drift_share": "leader",
    "kdgate_slo_breached": "leader",
    "kdgate_traffic_weight": "leader",
    # Rollouts are driven by the host's leader; its window alone holds the analysis.
    "kdgate_rollout_step": "leader",
    "kdgate_rollout_state": "leader",
    "kdgate_rollout_samples": "leader",
    "kdgate_rollout_check": "leader",
}
DEFAULT_GAUGE_MODE: Mode = "max"
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram", "unknown"})


def families_of(registry: CollectorRegistry) -> list[Family]:
    """Every family `registry` collects now, as JSON-able data (timestamps, exemplars dropped)."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "unit": family.unit,
            "samples": [[s.name, s.labels, repr(float(s.value))] for s in family.samples],
        }
        for family in registry.collect()
    ]


def merge(workers: Sequence[Sequence[Family]], *, leader: int | None = None) -> list[Family]:
    """One family list from several workers' (`leader`: the index in `workers` of the leader's
    families, None when it is not among them). Families and samples keep first-seen order."""
    merged: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    from_leader: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, families in enumerate(workers):
        for family in families:
            name = family["name"]
            if name not in merged:
                merged[name] = {**family, "samples": []}
                values[name] = {}
                from_leader[name] = {}
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                number = float(value)
                values[name].setdefault(key, []).append(number)
                if index == leader:
                    from_leader[name][key] = number
    for name, family in merged.items():
        mode = _mode(family["type"], name)
        family["samples"] = [
            [
                sample_name,
                dict(labels),
                repr(
                    _combine(mode, sample_name, found, from_leader[name].get((sample_name, labels)))
                ),
            ]
            for (sample_name, labels), found in values[name].items()
        ]
    return list(merged.values())


def _mode(kind: str, name: str) -> Mode:
    if kind in SUMMED_TYPES:
        return "sum"
    return GAUGE_MODES.get(name, DEFAULT_GAUGE_MODE)


def _combine(mode: Mode, sample_name: str, found: list[float], leader: float | None) -> float:
    if sample_name.endswith("_created"):
        return min(found)  # the series exists since its first worker created it
    if mode == "sum":
        return sum(found)
    if mode == "min":
        return min(found)
    if mode == "leader" and leader is not None:
        return leader
    return max(found)


class Families:
    """A collector over fixed families, for `generate_latest` (client_python's Collector API)."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        for family in self._families:
            metric = Metric(family["name"], family["help"], family["type"], family["unit"])
            for sample_name, labels, value in family["samples"]:
                metric.add_sample(sample_name, labels, float(value))
            yield metric
