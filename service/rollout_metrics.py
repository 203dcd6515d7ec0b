"""The rollout gauges, computed at scrape time from the rollouts of one app.

    registry.register(RolloutExport(rollouts))

Every process exports the step and the state of each model's latest rollout (every process
follows the traffic file); the samples and the checks are the latest analysis: the live one of
the current step on the process driving it, else the one of the last transition. With several
workers the merged `/metrics` takes the leader's values (service/exposition.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, get_args

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kdgate.service.traffic_store import RolloutRecord, RolloutState

STATES: tuple[str, ...] = get_args(RolloutState)
FIGURES = ("candidate", "incumbent", "difference", "low", "high")
# The rollout gauges: name -> (label names, help).
SERIES: dict[str, tuple[tuple[str, ...], str]] = {
    "kdgate_rollout_step": (
        ("model", "candidate"),
        "Index of the current step of a model's latest rollout (0 = first).",
    ),
    "kdgate_rollout_state": (
        ("model", "state"),
        "1 for the state of a model's latest rollout (running, paused, promoted, rolled_back, "
        "aborted), 0 for the others.",
    ),
    "kdgate_rollout_samples": (
        ("model",),
        "Paired rows the latest analysis rested on (the current step's window, else the last "
        "transition's).",
    ),
    "kdgate_rollout_check": (
        ("model", "check", "figure"),
        "The latest analysis per check (the current step's, else the last transition's): the "
        "candidate's and the incumbent's figure, their difference and its interval (low, high).",
    ),
}


class Latest(Protocol):
    """What the export reads: per model with a rollout, its record and latest analysis."""

    def latest(self) -> Iterator[tuple[str, RolloutRecord, dict[str, Any] | None]]: ...


class RolloutExport(Collector):
    """A collector (client_python's documented way) of the `SERIES` gauges."""

    def __init__(self, rollouts: Latest) -> None:
        self._rollouts = rollouts

    def collect(self) -> Iterable[Metric]:
        families = {
            name: GaugeMetricFamily(name, help_text, labels=list(labels))
            for name, (labels, help_text) in SERIES.items()
        }
        step, state, samples, check = families.values()
        for model, record, analysis in self._rollouts.latest():
            step.add_metric([model, record.candidate], record.step)
            for name in STATES:
                state.add_metric([model, name], float(record.state == name))
            if not analysis:
                continue
            samples.add_metric([model], analysis["samples"])
            for c in analysis["checks"]:
                for figure in FIGURES:
                    value = c[figure]  # None: not known yet (JSON has no NaN)
                    check.add_metric(
                        [model, c["name"], figure], math.nan if value is None else value
                    )
        return list(families.values())
