"""The in-process SLO monitor: bucketed sliding windows, hysteresis, breach callbacks.

    monitor = Monitor(objectives, settings.slo, metrics, on_breach=enqueue)  # (model, breach)
    task = asyncio.create_task(monitor.run(stop))  # each evaluate_every_seconds: sample+evaluate
    monitor.observe_drift("digits", share=0.12, rows=1000)  # from the drift job, any thread
    monitor.status()                                        # what GET /v1/slo returns

The monitor reads fidelity, calibration and latency from the Prometheus instruments the service
already updates (`sample`: the increase of each cumulative counter since the last call), so
neither the hot path nor the shadow worker calls it, and it sees exactly what the rendered
Prometheus rules see. Drift share arrives with its row count through `observe_drift`. Windows are
time buckets (`monitoring.window.BucketedWindow`): cost depends on the bucket count, not traffic.

Hysteresis: an SLO is breached after `consecutive_breaches` (k) failing evaluations in a row and
clears after k passing ones. A window with fewer than `min_samples` samples (or no data) is
"insufficient_data": it neither fails nor passes, so a breach neither starts nor clears while
traffic is missing. `kdgate_slo_breached{model,slo}` is 1 while breached.

The monitor judges a model over all its student versions (`version="teacher"` series, the
teacher's own label calibration, are excluded); the Prometheus rules judge each version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from prometheus_client.utils import floatToGoString

from kdgate.monitoring.metrics import CALIBRATION_BINS, LATENCY_BUCKETS_SECONDS, Metrics
from kdgate.monitoring.recorder import TEACHER_VERSION
from kdgate.monitoring.slo import Breach, Objective, SloConfig, SloName
from kdgate.monitoring.window import BucketedWindow

log = logging.getLogger(__name__)


def histogram_quantile(q: float, upper_bounds: Sequence[float], counts: npt.ArrayLike) -> float:
    """Prometheus `histogram_quantile` on non-cumulative bucket `counts` (last bucket is +Inf).

    Linear interpolation inside the bucket holding the rank, as PromQL does, so the in-process
    P95 equals the one Prometheus computes from the same buckets. NaN when there are no samples.
    """
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64))
    total = float(cumulative[-1]) if len(cumulative) else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    index = int(np.searchsorted(cumulative, rank, side="left"))
    if index >= len(upper_bounds):  # rank falls in +Inf: PromQL returns the last finite bound
        return float(upper_bounds[-1])
    lower = 0.0 if index == 0 else float(upper_bounds[index - 1])
    below = 0.0 if index == 0 else float(cumulative[index - 1])
    in_bucket = float(cumulative[index]) - below
    if in_bucket <= 0:
        return float(upper_bounds[index])
    return lower + (float(upper_bounds[index]) - lower) * (rank - below) / in_bucket


def le_label(bound: float) -> str:
    """The `le` label prometheus_client writes for a histogram bucket bound (0.1 -> "0.1")."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


@dataclass
class _State:
    breached: bool = False
    failing: int = 0
    passing: int = 0
    observed: float = math.nan
    samples: int = 0
    status: str = "insufficient_data"


BreachCallback = Callable[[str, Breach], None]

_REFERENCES: tuple[Literal["teacher", "label"], ...] = ("teacher", "label")
# Window vectors: fidelity [samples, agreements, kl_sum]; calibration [samples[15],
# confidence[15], correct[15]]; latency: requests per LATENCY_BUCKETS_SECONDS bucket, then +Inf.
_LATENCY_WIDTH = len(LATENCY_BUCKETS_SECONDS) + 1
_CALIBRATION_WIDTH = 3 * CALIBRATION_BINS
_FIDELITY_NAMES = (
    "kdgate_fidelity_samples_total",
    "kdgate_fidelity_agreements_total",
    "kdgate_fidelity_kl_divergence_nats_sum",
)
_CALIBRATION_NAMES = (
    "kdgate_calibration_samples_total",
    "kdgate_calibration_confidence_total",
    "kdgate_calibration_correct_total",
)
_LATENCY_NAME = "kdgate_request_duration_seconds_bucket"
_LE_INDEX = {le_label(b): i for i, b in enumerate(LATENCY_BUCKETS_SECONDS)} | {
    "+Inf": len(LATENCY_BUCKETS_SECONDS)
}


class Monitor:
    """Evaluates per-model `Objective`s over bucketed sliding windows, with hysteresis.

    `objectives`: model name -> objectives (see `monitoring.slo.objectives_for`).
    `on_breach(model, breach)` is called once per NEW breach (typically a function that builds
    the payload and calls `Outbox.enqueue_breach`; blocking, so `run` calls it in a thread).
    `clock` returns seconds (monotonic). Observations may come from any thread.
    """

    def __init__(
        self,
        objectives: Mapping[str, Sequence[Objective]],
        config: SloConfig,
        metrics: Metrics,
        on_breach: BreachCallback | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._objectives = {model: list(objs) for model, objs in objectives.items()}
        self._config = config
        self._metrics = metrics
        self._on_breach = on_breach
        self._clock = clock
        self._lock = threading.Lock()  # BucketedWindow is not thread-safe

        def window(width: int) -> BucketedWindow:
            bucket = config.window_seconds / config.window_buckets
            return BucketedWindow(
                width, window_seconds=config.window_seconds, bucket_seconds=bucket, clock=clock
            )

        self._fidelity = {m: window(3) for m in self._objectives}
        self._calibration = {
            (m, ref): window(_CALIBRATION_WIDTH) for m in self._objectives for ref in _REFERENCES
        }
        self._latency = {m: window(_LATENCY_WIDTH) for m in self._objectives}
        self._drift: dict[str, tuple[float, float, int]] = {}  # model -> (time, share, rows)
        self._states = {(m, o.slo): _State() for m, objs in self._objectives.items() for o in objs}
        # Every SLO has a series from the start (0 = not breached), so a dashboard shows the
        # status of SLOs still waiting for data instead of an empty panel.
        for model, slo in self._states:
            metrics.slo_breached.labels(model=model, slo=slo).set(0)
        self._last: dict[tuple[str, str, str, int], float] = {}
        self._failing = False  # the last hand-over failed: log tracebacks once per incident

    # -- observations -------------------------------------------------------------------------

    def observe_fidelity(
        self, model: str, samples: float, agreements: float, kl_sum: float
    ) -> None:
        """Compared pairs, how many agreed on top-1, and their summed KL (nats)."""
        if model in self._fidelity:
            with self._lock:
                self._fidelity[model].add((samples, agreements, kl_sum))

    def observe_calibration(
        self,
        model: str,
        reference: Literal["teacher", "label"],
        samples: npt.ArrayLike,
        confidence: npt.ArrayLike,
        correct: npt.ArrayLike,
    ) -> None:
        """Per-bin (15 bins) sample counts, top-1 confidence sums and correct counts."""
        key = (model, reference)
        if key in self._calibration:
            vector = np.concatenate([samples, confidence, correct])
            with self._lock:
                self._calibration[key].add(vector)

    def observe_latency(self, model: str, bucket_counts: npt.ArrayLike) -> None:
        """Request counts (not cumulative) per `LATENCY_BUCKETS_SECONDS` bucket, then +Inf."""
        if model in self._latency:
            with self._lock:
                self._latency[model].add(bucket_counts)

    def observe_drift(self, model: str, share: float, rows: int) -> None:
        """Result of one drift run: share of drifted columns over `rows` recent inputs."""
        with self._lock:
            self._drift[model] = (self._clock(), share, rows)

    def sample(self) -> None:
        """Window the increase of the exported counters since the previous call.

        Reads `kdgate_fidelity_*`, `kdgate_calibration_*_total` and the request-duration buckets
        from the registry, summed over student versions. A counter that went down was reset, so
        its whole value is the increase (as PromQL's `increase` assumes).
        """
        current: dict[tuple[str, str, str, int], float] = {}
        for family in self._metrics.registry.collect():
            for s in family.samples:
                model = s.labels.get("model", "")
                if model not in self._objectives or s.labels.get("version") == TEACHER_VERSION:
                    continue
                if s.name in _FIDELITY_NAMES:
                    key = (model, "fidelity", "", _FIDELITY_NAMES.index(s.name))
                elif s.name in _CALIBRATION_NAMES:
                    index = _CALIBRATION_NAMES.index(s.name) * CALIBRATION_BINS
                    key = (
                        model,
                        "calibration",
                        s.labels["reference"],
                        index + int(s.labels["bin"]),
                    )
                elif s.name == _LATENCY_NAME:
                    key = (model, "latency", "", _LE_INDEX[s.labels["le"]])
                else:
                    continue
                current[key] = current.get(key, 0.0) + s.value
        vectors: dict[tuple[str, str, str], npt.NDArray[np.float64]] = {}
        widths = {"fidelity": 3, "calibration": _CALIBRATION_WIDTH, "latency": _LATENCY_WIDTH}
        for key, value in current.items():
            previous = self._last.get(key, 0.0)
            model, kind, reference, index = key
            vector = vectors.setdefault((model, kind, reference), np.zeros(widths[kind]))
            vector[index] += value - previous if value >= previous else value
        self._last = current
        for (model, kind, reference), vector in vectors.items():
            if kind == "fidelity" and vector[0]:
                self.observe_fidelity(model, *vector.tolist())
            elif kind == "calibration" and vector[:CALIBRATION_BINS].any():
                for ref in _REFERENCES:
                    if ref == reference:
                        self.observe_calibration(model, ref, *np.split(vector, 3))
            elif kind == "latency" and vector[-1]:
                # Prometheus buckets are cumulative; the window holds per-bucket counts.
                self.observe_latency(model, np.diff(vector, prepend=0.0))

    # -- evaluation ---------------------------------------------------------------------------

    def _observed(self, model: str, slo: SloName, now: float) -> tuple[float, int]:
        with self._lock:
            if slo in ("agreement", "kl_mean"):
                samples, agreements, kl_sum = self._fidelity[model].total().tolist()
                if not samples:
                    return math.nan, 0
                return (agreements if slo == "agreement" else kl_sum) / samples, int(samples)
            if slo in ("ece_teacher", "ece_label"):
                reference: Literal["teacher", "label"] = (
                    "teacher" if slo == "ece_teacher" else "label"
                )
                counts, conf, correct = np.split(self._calibration[(model, reference)].total(), 3)
                n = float(counts.sum())
                ece = float(np.abs(correct - conf).sum() / n) if n else math.nan
                return ece, int(n)
            if slo == "p95_latency":
                counts = self._latency[model].total()
                return histogram_quantile(0.95, LATENCY_BUCKETS_SECONDS, counts), int(counts.sum())
            seen, share, rows = self._drift.get(model, (-math.inf, math.nan, 0))
            if now - seen > self._config.window_seconds:
                return math.nan, 0
            return share, rows

    def evaluate(self) -> list[tuple[str, Breach]]:
        """Evaluate every objective once; set `kdgate_slo_breached`; report NEW breaches.

        Returns the new breaches as (model, breach) and passes each to `on_breach`.
        """
        now = self._clock()
        k = self._config.consecutive_breaches
        new: list[tuple[str, Breach]] = []
        for model, objectives in self._objectives.items():
            for objective in objectives:
                state = self._states[(model, objective.slo)]
                state.observed, state.samples = self._observed(model, objective.slo, now)
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

        `observed` is None when the window holds no samples (JSON has no NaN).
        """
        rows = []
        for model, objectives in self._objectives.items():
            for o in objectives:
                state = self._states[(model, o.slo)]
                rows.append(
                    {
                        "model": model,
                        "slo": o.slo,
                        "status": state.status,
                        "observed": None if math.isnan(state.observed) else state.observed,
                        "objective": o.objective,
                        "kind": o.kind,
                        "source": o.source,
                        "samples": state.samples,
                        "min_samples": o.min_samples,
                        "window_seconds": o.window_seconds,
                    }
                )
        return rows

    async def run(self, stop: asyncio.Event) -> None:
        """Sample and evaluate every `evaluate_every_seconds` until `stop` is set.

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
                    self.sample()
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
