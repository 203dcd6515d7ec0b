"""Recent request latency per model, read from `kdgate_request_duration_seconds`.

`LatencyWindow(metrics)` windows the increase of the exported latency histogram (summed over a
model's versions) since the previous `sample()`, so the hot path pays nothing extra: call
`sample()` every few seconds from a background task (and before reading). `p95(model)` is
PromQL's `histogram_quantile(0.95, ...)` over the buckets of the window, in seconds. Not
thread-safe: use it from the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS, Metrics
from kdgate.monitoring.slo_monitor import histogram_quantile
from kdgate.monitoring.window import BucketedWindow

_BUCKET = "kdgate_request_duration_seconds_bucket"
_WIDTH = len(LATENCY_BUCKETS_SECONDS) + 1  # then +Inf


class LatencyWindow:
    """Per-model latency bucket counts over the last `window_seconds`."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        window_seconds: float = 300.0,
        bucket_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.window_seconds = window_seconds
        self._bucket_seconds = bucket_seconds
        self._clock = clock
        self._index = {bound: i for i, bound in enumerate(LATENCY_BUCKETS_SECONDS)}
        self._index[math.inf] = len(LATENCY_BUCKETS_SECONDS)
        self._last: dict[str, np.ndarray] = {}
        self._windows: dict[str, BucketedWindow] = {}

    def sample(self) -> None:
        """Add each model's requests since the previous call to the current time bucket."""
        cumulative: dict[str, np.ndarray] = {}
        for family in self.metrics.request_duration.collect():
            for s in family.samples:
                if s.name == _BUCKET:
                    row = cumulative.setdefault(s.labels["model"], np.zeros(_WIDTH))
                    row[self._index[float(s.labels["le"])]] += s.value
        for model, now in cumulative.items():
            before = self._last.get(model)
            # A counter that went down was reset: all of it is new (as PromQL's increase assumes).
            increase = now if before is None or (now < before).any() else now - before
            self._last[model] = now
            if increase[-1] > 0:
                self._window(model).add(np.diff(increase, prepend=0.0))

    def p95(self, model: str) -> float | None:
        """P95 request latency of `model` over the window, seconds; None without requests."""
        window = self._windows.get(model)
        if window is None:
            return None
        counts = window.total()
        if counts.sum() <= 0:
            return None
        return histogram_quantile(0.95, LATENCY_BUCKETS_SECONDS, counts)

    def _window(self, model: str) -> BucketedWindow:
        window = self._windows.get(model)
        if window is None:
            window = BucketedWindow(
                _WIDTH,
                window_seconds=self.window_seconds,
                bucket_seconds=self._bucket_seconds,
                clock=self._clock,
            )
            self._windows[model] = window
        return window
