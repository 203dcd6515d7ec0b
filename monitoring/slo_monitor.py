"""The in-process SLO monitor: objectives over the recent window, hysteresis, breach callbacks.

    monitor = Monitor(objectives, settings.slo, metrics, window, on_breach=enqueue)
    task = asyncio.create_task(monitor.run(stop))  # each evaluate_every_seconds: evaluate
    monitor.status()                                # what GET /v1/slo returns

The monitor reads every figure from the app's `RecentWindow` (monitoring/recent.py), the same
per-version view `GET /v1/fidelity` reads: fidelity and calibration arrive there from the
recorder, latency from the request log's settle, drift share from the drift job. Neither the hot
path nor the shadow worker calls the monitor.

Hysteresis: an SLO is breached after `consecutive_breaches` (k) failing evaluations in a row and
clears after k passing ones. A window with fewer than `min_samples` samples (or no data) is
"insufficient_data": it neither fails nor passes, so a breach neither starts nor clears while
traffic is missing. `kdgate_slo_breached{model,slo}` is 1 while breached.

The monitor judges a model over all its student versions (the `version="teacher"` figures, the
teacher's own label calibration, are excluded); the Prometheus rules judge each version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdgate.monitoring.metrics import Metrics, le_label
from kdgate.monitoring.recent import Figures, RecentWindow, histogram_quantile
from kdgate.monitoring.slo import Breach, Objective, SloConfig, SloName

log = logging.getLogger(__name__)

__all__ = ["Monitor", "histogram_quantile", "le_label"]


@dataclass
class _State:
    breached: bool = False
    failing: int = 0
    passing: int = 0
    observed: float = math.nan
    samples: int = 0
    status: str = "insufficient_data"


BreachCallback = Callable[[str, Breach], None]


class Monitor:
    """Evaluates per-model `Objective`s over `window`, with hysteresis.

    `objectives`: model name -> objectives (see `monitoring.slo.objectives_for`).
    `window`: the app's recent window (its `window_seconds` is the SLO window).
    `on_breach(model, breach)` is called once per NEW breach (typically a function that builds
    the payload and calls `Outbox.enqueue_breach`; blocking, so `run` calls it in a thread).
    """

    def __init__(
        self,
        objectives: Mapping[str, Sequence[Objective]],
        config: SloConfig,
        metrics: Metrics,
        window: RecentWindow,
        on_breach: BreachCallback | None = None,
    ) -> None:
        self._objectives = {model: list(objs) for model, objs in objectives.items()}
        self._config = config
        self._metrics = metrics
        self.window = window
        self._on_breach = on_breach
        self._states = {(m, o.slo): _State() for m, objs in self._objectives.items() for o in objs}
        # Every SLO has a series from the start (0 = not breached), so a dashboard shows the
        # status of SLOs still waiting for data instead of an empty panel.
        for model, slo in self._states:
            metrics.slo_breached.labels(model=model, slo=slo).set(0)
        self._failing = False  # the last hand-over failed: log tracebacks once per incident

    def _observed(self, model: str, slo: SloName, f: Figures) -> tuple[float, int]:
        if slo == "drift_share":
            drift = self.window.drift(model)
            return (math.nan, 0) if drift is None else (drift.share, drift.rows)
        value, samples = {
            "agreement": (f.agreement, f.samples),
            "kl_mean": (f.mean_kl, f.samples),
            "ece_teacher": (f.ece_teacher, f.samples),
            "ece_label": (f.ece_label, f.label_samples),
            "p95_latency": (f.p95_latency_seconds, f.requests),
        }[slo]
        return (math.nan if value is None else value), samples

    def evaluate(self) -> list[tuple[str, Breach]]:
        """Evaluate every objective once; set `kdgate_slo_breached`; report NEW breaches.

        Returns the new breaches as (model, breach) and passes each to `on_breach`.
        """
        k = self._config.consecutive_breaches
        new: list[tuple[str, Breach]] = []
        for model, objectives in self._objectives.items():
            figures = self.window.figures(model)
            for objective in objectives:
                state = self._states[(model, objective.slo)]
                state.observed, state.samples = self._observed(model, objective.slo, figures)
                if state.samples < objective.min_samples or math.isnan(state.observed):
                    state.status = "insufficient_data" if not state.breached else "breached"
                    continue
                if objective.met(state.observed):
                    state.passing, state.failing = state.passing + 1, 0
                    if state.breached and state.passing >= k:
                        state.breached = False
                else:
                    state.failing, state.passing = state.failing + 1, 0
                    if not state.breached and state.failing >= k:
                        state.breached = True
                        new.append((model, self._breach(objective, state)))
                state.status = "breached" if state.breached else "ok"
                self._metrics.slo_breached.labels(model=model, slo=objective.slo).set(
                    1 if state.breached else 0
                )
        if self._on_breach is not None:
            for model, breach in new:
                self._on_breach(model, breach)
        return new

    @staticmethod
    def _breach(objective: Objective, state: _State) -> Breach:
        return Breach(
            slo=objective.slo,
            observed=state.observed,
            objective=objective.objective,
            window_seconds=objective.window_seconds,
            samples=state.samples,
        )

    def status(self) -> list[dict[str, Any]]:
        """Per model and SLO: status (ok | breached | insufficient_data), observed, objective,
        kind (min | max), source, samples, min_samples, window_seconds. For GET /v1/slo.

        `observed` and `samples` are read from the window now, so they equal what
        `GET /v1/fidelity` reports at the same moment; `status` is the hysteresis state of the
        last evaluation. `observed` is None when the window holds no samples (JSON has no NaN).
        """
        rows = []
        for model, objectives in self._objectives.items():
            figures = self.window.figures(model)
            for o in objectives:
                state = self._states[(model, o.slo)]
                observed, samples = self._observed(model, o.slo, figures)
                rows.append(
                    {
                        "model": model,
                        "slo": o.slo,
                        "status": state.status,
                        "observed": None if math.isnan(observed) else observed,
                        "objective": o.objective,
                        "kind": o.kind,
                        "source": o.source,
                        "samples": samples,
                        "min_samples": o.min_samples,
                        "window_seconds": o.window_seconds,
                    }
                )
        return rows

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate every `evaluate_every_seconds` until `stop` is set.

        Evaluation is a few microseconds of numpy per SLO, so it runs on the loop; `on_breach`
        (a database write) runs in a worker thread. A round or an `on_breach` that raises is
        logged and the task goes on: a breach whose `on_breach` failed stays pending and is
        handed over again at each following evaluation until it succeeds (at most one per
        model and SLO), so an outbox that cannot be written for a while delays a retrain request
        but never loses it.
        """
        callback, self._on_breach = self._on_breach, None
        pending: list[tuple[str, Breach]] = []
        try:
            while not stop.is_set():
                try:
                    for model, breach in self.evaluate():
                        # One pending request per SLO: a later breach of an SLO still waiting
                        # is the same incident (and the outbox cooldown would refuse it).
                        if all((m, b["slo"]) != (model, breach["slo"]) for m, b in pending):
                            pending.append((model, breach))
                except Exception:
                    log.exception("SLO evaluation failed; trying again at the next one")
                if callback is not None:
                    pending = await self._hand_over(callback, pending)
                else:
                    pending.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._config.evaluate_every_seconds)
        finally:
            self._on_breach = callback

    async def _hand_over(
        self, callback: BreachCallback, breaches: list[tuple[str, Breach]]
    ) -> list[tuple[str, Breach]]:
        """Pass each breach to `callback` (in a thread); return those it failed on."""
        failed = []
        for model, breach in breaches:
            try:
                await asyncio.to_thread(callback, model, breach)
            except Exception as exc:
                failed.append((model, breach))
                log.error(
                    "retrain request for SLO %s of %s not stored (%s: %s); it stays pending and"
                    " is retried at the next evaluation",
                    breach["slo"],
                    model,
                    type(exc).__name__,
                    exc,
                    exc_info=len(failed) == 1 and not self._failing,
                )
        self._failing = bool(failed)
        return failed
