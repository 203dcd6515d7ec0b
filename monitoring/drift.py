"""Input drift: the last N inputs against the reference sample, with Evidently 0.7.

    buffer = InputBuffer(capacity=config.window_rows, width=64)
    buffer.append(rows)                        # request path: O(1), no lock, no copy
    job = DriftJob("digits", buffer, load_reference(path), config, metrics,
                   on_result=monitor.observe_drift)
    task = asyncio.create_task(job.run(stop))  # every `every_seconds`, in a worker thread
    job.latest_html                            # bytes for GET /v1/reports/drift (None before)

One run builds an Evidently `Report([DriftedColumnsCount(method=..., threshold=...)])` over the
columns, declared numerical (plus a `ValueDrift` per column with `report: columns`), and sets
the share of drifted columns in `kdgate_input_drift_share{model}`. Evidently is imported inside
`evidently_drift` (the import alone takes seconds and pulls in pandas and plotly), and the run is
CPU-bound Python: `DriftJob` runs it in a worker thread, or in a child process when given a
`ProcessPoolExecutor` (recommended in serving, so the run does not compete for the GIL with the
event loop).

Method (`DriftConfig.method`, any Evidently stattest name): default "wasserstein" (distance
normalised by the reference standard deviation, threshold 0.1): its score does not grow with the
sample size, so clean traffic stays quiet at N = 5000 as at N = 500, unlike p-value tests ("ks")
that flag negligible shifts on large samples. "psi" is noisier on small windows (digits pixels
have up to 17 values, and PSI on 17 cells from 500 rows fluctuates around its 0.1 threshold).

Constant columns (digits has pixels that are always 0): a column constant in both samples at the
same value scores 0 with every method and never counts as drifted; a column constant in the
reference that varies (or moves) in the current sample is drift, which it is. The share is over
all columns, so the denominator does not change with the data.

Without Evidently installed, `numpy_drift` computes the same share with PSI in pure numpy
(`psi` reproduces Evidently's PSI binning), without an HTML report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from kdgate.monitoring.metrics import Metrics

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
PSI_THRESHOLD = 0.1  # Evidently's default for PSI
PSI_MAX_CATEGORIES = 20  # Evidently bins by value up to 20 distinct reference values


class DriftConfig(BaseModel):
    """The `drift:` section: what the drift job compares, how, and how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    reference_file: str = Field(
        default="reference.npz", description="beside the student's card, or an absolute path"
    )
    method: str = Field(default="wasserstein", description="Evidently stattest name")
    threshold: float | None = Field(default=None, gt=0, description="None = method default")
    window_rows: int = Field(default=1000, ge=10, description="last N inputs compared")
    min_rows: int = Field(default=200, ge=1, description="skip runs with fewer rows")
    every_seconds: float = Field(default=60.0, gt=0)
    html_report: bool = True
    report: Literal["summary", "columns"] = Field(
        default="summary", description="columns: add per-column ValueDrift (about 4x slower)"
    )
    reference_key: str = "inputs"
    executor: Literal["process", "thread"] = Field(
        default="process", description="process: a child process, off the event loop's GIL"
    )


@dataclass(frozen=True)
class DriftResult:
    """One drift run: share of drifted columns, per-column scores, the HTML report if made."""

    share: float
    drifted: int
    columns: int
    rows: int
    method: str
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)
    html: bytes | None = None


class InputBuffer:
    """The last `capacity` input rows (float32, `width` columns), for the drift job.

    `append` runs on the request path, so it is O(1) and takes no lock: it keeps a reference to
    the caller's array (which must not change afterwards; decoded request inputs never do) in a
    deque of at most `capacity` entries, and `snapshot` copies the newest `capacity` rows out.
    A batch larger than `capacity` is trimmed (copied) on append, so memory stays below
    `capacity` entries of at most `capacity` rows each.
    """

    def __init__(self, capacity: int, width: int) -> None:
        self.capacity = capacity
        self.width = width
        # deque.append is atomic: the event loop appends while a worker thread snapshots.
        self._entries: deque[npt.NDArray[np.float32]] = deque(maxlen=capacity)

    def append(self, rows: npt.ArrayLike) -> None:
        """Add rows ([n, width] or [width]); keeps the newest `capacity` rows."""
        batch = np.asarray(rows, dtype=np.float32)
        if batch.ndim != 2:
            batch = batch.reshape(-1, self.width)
        if len(batch) > self.capacity:
            batch = batch[-self.capacity :].copy()  # no view pinning a huge request body
        self._entries.append(batch)

    def _recent(self) -> list[npt.NDArray[np.float32]]:
        while True:
            try:
                return list(self._entries)
            except RuntimeError:  # "deque mutated during iteration": an append raced; retry
                continue

    def snapshot(self) -> npt.NDArray[np.float32]:
        """A copy of the newest `capacity` rows, oldest first."""
        entries = self._recent()
        if not entries:
            return np.zeros((0, self.width), dtype=np.float32)
        return np.concatenate(entries)[-self.capacity :]

    def __len__(self) -> int:
        return min(sum(len(e) for e in self._recent()), self.capacity)


def load_reference(path: Path | str, key: str = "inputs") -> npt.NDArray[np.float32]:
    """The reference inputs [N, columns] stored under `key` in an .npz file (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data[key], dtype=np.float32)


def psi(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Population stability index of one column, binned as Evidently 0.7 bins it.

    More than 20 distinct reference values: Sturges bins over both samples; else one cell per
    distinct value of either sample. Empty cells get 1e-4 (or a millionth of the smallest
    non-empty share when that is <= 1e-4). PSI = sum((ref - cur) * ln(ref / cur)); NaNs ignored.
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cur = np.asarray(current, dtype=np.float64).ravel()
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if len(np.unique(ref)) > PSI_MAX_CATEGORIES:
        edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
        ref_share = np.histogram(ref, edges)[0] / len(ref)
        cur_share = np.histogram(cur, edges)[0] / len(cur)
    else:
        cells = np.union1d(ref, cur)
        ref_share = np.bincount(np.searchsorted(cells, ref), minlength=len(cells)) / len(ref)
        cur_share = np.bincount(np.searchsorted(cells, cur), minlength=len(cells)) / len(cur)
    ref_share, cur_share = _fill_empty(ref_share), _fill_empty(cur_share)
    return float(np.sum((ref_share - cur_share) * np.log(ref_share / cur_share)))


def _fill_empty(share: FloatArray) -> FloatArray:
    smallest = share[share > 0].min()
    return np.where(share == 0, smallest / 1e6 if smallest <= 1e-4 else 1e-4, share)


def numpy_drift(
    current: npt.ArrayLike, reference: npt.ArrayLike, threshold: float = PSI_THRESHOLD
) -> DriftResult:
    """Share of columns whose PSI >= `threshold` (pure numpy; the fallback without Evidently)."""
    started = time.perf_counter()
    cur, ref = np.asarray(current), np.asarray(reference)
    scores = {f"input_{i}": psi(ref[:, i], cur[:, i]) for i in range(ref.shape[1])}
    drifted = sum(score >= threshold for score in scores.values())
    return DriftResult(
        share=drifted / len(scores),
        drifted=drifted,
        columns=len(scores),
        rows=len(cur),
        method="psi (numpy)",
        seconds=time.perf_counter() - started,
        scores=scores,
    )


def evidently_drift(
    current: npt.ArrayLike,
    reference: npt.ArrayLike,
    method: str = "wasserstein",
    threshold: float | None = None,
    html: bool = True,
    per_column: bool = False,
) -> DriftResult:
    """Evidently 0.7 drift over all columns (declared numerical); blocking, CPU-bound.

    The report holds `DriftedColumnsCount` (the share), plus one `ValueDrift` per column (scores
    and a distribution plot each, about 4x the time) with `per_column`. A top-level function of
    plain arguments, so it can run in a child process.
    """
    started = time.perf_counter()
    cur, ref = np.asarray(current), np.asarray(reference)
    columns = [f"input_{i}" for i in range(ref.shape[1])]
    with warnings.catch_warnings():
        # Evidently's own warnings are not ours to act on: it touches the deprecated numpy.core
        # at import, and its correlation widgets divide by the zero variance of constant columns.
        warnings.simplefilter("ignore")
        import pandas as pd
        from evidently import DataDefinition, Dataset, Report
        from evidently.metrics import DriftedColumnsCount, ValueDrift

        definition = DataDefinition(numerical_columns=columns)

        def dataset(rows: npt.NDArray[np.generic]) -> Dataset:
            frame = pd.DataFrame(rows, columns=columns)
            return Dataset.from_pandas(frame, data_definition=definition)

        metrics: list[DriftedColumnsCount | ValueDrift] = [
            DriftedColumnsCount(method=method, threshold=threshold)
        ]
        if per_column:
            metrics += [ValueDrift(column=c, method=method, threshold=threshold) for c in columns]
        report = Report(metrics)
        snapshot = report.run(dataset(cur), dataset(ref))
        page = snapshot.get_html_str(as_iframe=False).encode() if html else None
    share, drifted, scores = 0.0, 0, {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("DriftedColumnsCount"):
            share, drifted = float(metric["value"]["share"]), int(metric["value"]["count"])
        elif config.get("type", "").endswith("ValueDrift"):
            scores[config["column"]] = float(metric["value"])
    return DriftResult(
        share=share,
        drifted=drifted,
        columns=len(columns),
        rows=len(cur),
        method=method,
        seconds=time.perf_counter() - started,
        scores=scores,
        html=page,
    )


def compute_drift(
    current: npt.ArrayLike, reference: npt.ArrayLike, config: DriftConfig
) -> DriftResult:
    """Evidently when installed, else the numpy PSI fallback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # see evidently_drift
            import evidently  # noqa: F401
    except ImportError:
        return numpy_drift(current, reference, config.threshold or PSI_THRESHOLD)
    return evidently_drift(
        current,
        reference,
        config.method,
        config.threshold,
        html=config.html_report,
        per_column=config.report == "columns",
    )


class DriftJob:
    """Periodic drift runs for one model; keeps the latest result and HTML report.

    `on_result(model, share, rows)` receives every result (e.g. `Monitor.observe_drift`).
    `executor`: where `compute_drift` runs; None = in the calling worker thread.
    """

    def __init__(
        self,
        model: str,
        buffer: InputBuffer,
        reference: npt.ArrayLike,
        config: DriftConfig,
        metrics: Metrics,
        *,
        on_result: Callable[[str, float, int], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.model = model
        self._buffer = buffer
        self._reference = np.asarray(reference, dtype=np.float32)
        self._config = config
        self._metrics = metrics
        self._on_result = on_result
        self._executor = executor
        self.latest: DriftResult | None = None

    @property
    def latest_html(self) -> bytes | None:
        """The HTML report of the latest run (None before the first run or without Evidently)."""
        return None if self.latest is None else self.latest.html

    def run_once(self) -> DriftResult | None:
        """One drift run on the buffered rows (blocking: call from a worker thread).

        Returns None, and changes nothing, when fewer than `min_rows` rows are buffered.
        """
        current = self._buffer.snapshot()
        if len(current) < self._config.min_rows:
            return None
        if self._executor is None:
            result = compute_drift(current, self._reference, self._config)
        else:
            result = self._executor.submit(
                compute_drift, current, self._reference, self._config
            ).result()
        self.latest = result
        self._metrics.input_drift_share.labels(model=self.model).set(result.share)
        if self._on_result is not None:
            self._on_result(self.model, result.share, result.rows)
        log.info(
            "drift %s: %d/%d columns drifted over %d rows (%s, %.2f s)",
            self.model,
            result.drifted,
            result.columns,
            result.rows,
            result.method,
            result.seconds,
        )
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """Run every `every_seconds` in a worker thread until `stop` is set."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:  # a failing run must not end the job; the next one may succeed
                log.exception("drift run for %s failed", self.model)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.every_seconds)
