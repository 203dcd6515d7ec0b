"""Request counts and latency: the request log's metrics consumer.

    request_metrics = RequestMetrics(models, window=window)   # window: the app's RecentWindow
    log = RequestLog(consumers=[request_metrics, ...])
    registry.register(request_metrics.export(before=log.settle))

Per settled batch and variant, `consume` adds the status counts to `kdgate_requests_total` and
the latencies to `kdgate_request_duration_seconds` (one `np.searchsorted` + `np.bincount`), and
the same latency bucket counts to the recent window, where `/v1/fidelity` and `/v1/slo` read
P95. It may run on any thread: the families take their own lock once per batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter, sub

import numpy as np

from kdgate.monitoring.metrics import (
    CounterSeries,
    Export,
    HistogramSeries,
    bucket_counts,
    request_families,
)
from kdgate.monitoring.recent import RecentWindow
from kdgate.service.request_log import Served
from kdgate.service.routing import Variant

_VARIANT = attrgetter("variant")
_CODE = attrgetter("protocol", "status")
_ANSWERED = attrgetter("answered")
_STARTED = attrgetter("started")

PROTOCOLS = ("v2", "v1")
COMMON_CODES = (200, 400, 404, 413, 500, 503)


class _Series:
    """The series of one (model, version), bound once."""

    __slots__ = ("codes", "duration", "model", "version")

    def __init__(self, metrics: RequestMetrics, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.codes: dict[tuple[str, int], CounterSeries] = {}
        self.duration: HistogramSeries = metrics.duration.labels(model, version)


class RequestMetrics:
    """`kdgate_requests_total` and `kdgate_request_duration_seconds`, fed in bulk."""

    any_thread = True

    def __init__(self, models: Iterable[str], *, window: RecentWindow | None = None) -> None:
        self.requests, self.duration = request_families()
        self.models = frozenset(models)
        self.window = window
        self._series: dict[tuple[str, str], _Series] = {}

    def export(self, *, before: Callable[[], None]) -> Export:
        """A collector of both families that runs `before` (the log's settle) first."""
        return Export([self.requests, self.duration], before=before)

    def bind(self, model: str, version: str) -> None:
        """Create a served version's series now (the common codes at 0): they export before
        its first request, so `increase()` sees the first one."""
        series = self._bound(model, version)
        for protocol in PROTOCOLS:
            for code in COMMON_CODES:
                self._counter(series, protocol, code)

    def consume(self, rows: Sequence[Served]) -> None:
        """Count a settled batch of answered requests."""
        variants = set(map(_VARIANT, rows))
        by_variant: dict[Variant | None, Sequence[Served]]
        if len(variants) == 1:  # the usual batch: one version served it all
            by_variant = {variants.pop(): rows}
        else:
            grouped: dict[Variant | None, list[Served]] = {}
            for row in rows:
                grouped.setdefault(row.variant, []).append(row)
            by_variant = dict(grouped)
        for variant, answered in by_variant.items():
            if variant is None:
                self._unrouted(answered)
                continue
            series = self._bound(variant.model, variant.version)
            for (protocol, status), count in Counter(map(_CODE, answered)).items():
                self._counter(series, protocol, status).inc(count)
            # map + operator: the per-row work stays in C.
            ends, starts = map(_ANSWERED, answered), map(_STARTED, answered)
            seconds = np.fromiter(map(sub, ends, starts), np.float64, len(answered))
            counts = bucket_counts(self.duration.upper_bounds, seconds)
            series.duration.add(counts, float(seconds.sum()))
            if self.window is not None:
                self.window.add_latency(series.model, series.version, counts)

    def _unrouted(self, rows: Sequence[Served]) -> None:
        # Requests no variant served (unknown model, not ready) count under version "", and
        # model "" when the name is not served: no unbounded label values.
        codes = Counter((r.model, r.protocol, r.status) for r in rows)
        for (model, protocol, status), count in codes.items():
            known = model if model in self.models else ""
            self.requests.labels(known, "", protocol, str(status)).inc(count)

    def _bound(self, model: str, version: str) -> _Series:
        series = self._series.get((model, version))
        if series is None:
            series = self._series[(model, version)] = _Series(self, model, version)
        return series

    def _counter(self, series: _Series, protocol: str, code: int) -> CounterSeries:
        counter = series.codes.get((protocol, code))
        if counter is None:
            counter = series.codes[(protocol, code)] = self.requests.labels(
                series.model, series.version, protocol, str(code)
            )
        return counter
