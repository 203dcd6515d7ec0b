"""Drift: the last N feature rows of a model against its reference sample, with Evidently 0.7.

    features = DriftFeatures.for_signature(...)          # what is compared (drift_features.py)
    reference = Reference(rows, source=f"file {path}")   # or Reference.served(1000, keep=...)
    buffer = InputBuffer(capacity=config.window_rows, width=len(features.columns))
    rest = reference.take(block); buffer.append(rest)    # event loop, per settled batch
    job = DriftJob("digits", buffer, reference, config, metrics, features=features,
                   on_result=window.set_drift)
    task = asyncio.create_task(job.run(stop))  # every `every_seconds`, in a worker thread
    job.latest_html                            # bytes for GET /v1/reports/drift (None before)
    job.status()                               # what GET /v1/slo shows

The rows are a table's input columns, or for any other model its predicted class and confidence
(and optionally random projections of its inputs). The reference is the model's sample file, or
the first `reference_rows` rows served (`Reference.served`: until it is complete the job reports
"collecting" and does not run; the rows that make it are never also in the compared window).

One run builds an Evidently `Report([DriftedColumnsCount(num_method=..., cat_method=...)])` over
the columns, numerical except the predicted class (categorical, `categorical_method`, PSI by
default), plus a `ValueDrift` per prediction column (its score) and per column with
`report: columns`, and sets the share of drifted columns in `kdgate_input_drift_share{model}`.
Evidently is imported inside `evidently_drift` (the import alone takes seconds and pulls in
pandas and plotly), and the run is CPU-bound Python: `DriftJob` runs it in a worker thread, or in
a child process when given a `ProcessPoolExecutor` (recommended in serving, so the run does not
compete for the GIL with the event loop).

Method (`DriftConfig.method`, any Evidently stattest name): default "wasserstein" (distance
normalised by the reference standard deviation, threshold 0.1): its score does not grow with the
sample size, so clean traffic stays quiet at N = 5000 as at N = 500, unlike p-value tests ("ks")
that flag negligible shifts on large samples. "psi" is noisier on small windows (digits pixels
have up to 17 values, and PSI on 17 cells from 500 rows fluctuates around its 0.1 threshold).
Wasserstein is not free of noise either: between two clean samples of one distribution its
normalised distance exceeds 0.1 on ~46 % of columns at 200 vs 600 rows, ~9 % at 500 vs 1000,
~4 % at 1000 vs 1000 (Gaussian simulation), hence `reference_rows` = `window_rows` = 1000.

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
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from kdgate.monitoring.drift_features import DriftFeatures
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
    reference_key: str = Field(
        default="inputs", description="the array of a single-input model, besides its own name"
    )
    reference_rows: int = Field(
        default=1000, ge=10, description="no reference file: the first N served rows become it"
    )
    predictions: Literal["auto", "always", "never"] = Field(
        default="auto", description="predicted class + confidence; auto: models that are not tables"
    )
    projection: int = Field(
        default=0, ge=0, le=256, description="random directions of the inputs; 0 = off; not tables"
    )
    projection_seed: int = 0
    categorical_method: str = Field(
        default="psi", description="Evidently stattest for the predicted class"
    )
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
    """The last `capacity` feature rows (float32, `width` columns), for the drift job.

    `append` runs on the event loop for every settled batch of requests, so it is O(1) and takes
    no lock: it keeps a reference to the caller's array (which must not change afterwards; the
    drift rows of a batch and decoded request inputs never do) in a deque, and drops the oldest
    arrays as soon as the newer ones hold `capacity` rows without them; `snapshot` copies the
    newest `capacity` rows out. A batch larger than `capacity` is trimmed (copied) on append, so
    the rows held stay below `capacity` plus one batch. (Bounding the arrays' count instead held
    up to `capacity` arrays of a settle's ~64 rows: ~17 MiB for the default 1000 rows of the
    digits student, where 1000 rows are 0.3 MiB.)
    """

    def __init__(self, capacity: int, width: int) -> None:
        self.capacity = capacity
        self.width = width
        # deque.append and popleft are atomic: the event loop appends (and drops the oldest)
        # while a worker thread snapshots. `maxlen` bounds the count of empty arrays.
        self._entries: deque[npt.NDArray[np.float32]] = deque(maxlen=capacity)
        self._rows = 0  # rows in `_entries` (the appending thread's count)

    def append(self, rows: npt.ArrayLike) -> None:
        """Add rows ([n, width] or [width]); keeps the newest `capacity` rows."""
        batch = np.asarray(rows, dtype=np.float32)
        if batch.ndim != 2:
            batch = batch.reshape(-1, self.width)
        if len(batch) > self.capacity:
            batch = batch[-self.capacity :].copy()  # no view pinning a huge request body
        entries = self._entries
        if len(entries) == entries.maxlen:  # the oldest is about to fall out by itself
            self._rows -= len(entries[0])
        entries.append(batch)
        self._rows += len(batch)
        while self._rows - len(entries[0]) >= self.capacity:  # the newer ones are enough
            self._rows -= len(entries.popleft())

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


def load_reference_inputs(
    path: Path | str, names: Sequence[str], key: str = "inputs"
) -> dict[str, npt.NDArray[Any]]:
    """A reference sample's inputs by name from an .npz file (no pickle): one array per input
    name, or for a single input the array under `key` (how digits' file stores it).

    Raises ValueError naming the arrays found when the file has not every input.
    """
    with np.load(path, allow_pickle=False) as data:
        found = list(data.files)
        if all(name in found for name in names):
            arrays = {name: data[name] for name in names}
        elif len(names) == 1 and key in found:
            arrays = {names[0]: data[key]}
        else:
            raise ValueError(
                f"{path} holds {found}; a drift reference needs one array per input {list(names)}"
                + (f" (or {key!r})" if len(names) == 1 else "")
            )
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"{path}: the inputs' arrays have {sorted(counts)} rows; need one count")
    return arrays


class Reference:
    """The rows drift compares against: a file's (complete from the start) or the first `size`
    rows served (`served`), collected on the event loop by `take` and fixed once complete.

    `rows` (any thread) is None until the sample is complete: a worker thread reads it while the
    event loop collects, and the array is published with one assignment once built.

    A served reference given `keep` (a file path) is written there once complete (`save`, from
    the drift job's thread) and read back at the next start while `identity` (the student and
    the columns it was made with) is the same: a restart in the middle of an incident must not
    make the drifted traffic the new reference.
    """

    def __init__(
        self,
        rows: npt.ArrayLike | None = None,
        *,
        source: str,
        size: int | None = None,
        keep: Path | None = None,
        identity: str = "",
    ) -> None:
        self.source = source
        self.keep, self.identity = keep, identity
        self.rows: npt.NDArray[np.float32] | None = None
        self.saved = False
        self._parts: list[npt.NDArray[np.float32]] = []
        if rows is not None:
            self.rows = np.asarray(rows, dtype=np.float32)
            self.size = self.collected = len(self.rows)
        else:
            assert size is not None
            self.size, self.collected = size, 0

    @classmethod
    def served(cls, size: int, *, keep: Path | None = None, identity: str = "") -> Reference:
        """The first `size` rows served; the ones kept in `keep` if it holds them for the same
        `identity` (a file that does not is ignored, and replaced once collected again)."""
        reference = cls(source="served", size=size, keep=keep, identity=identity)
        if keep is None or not keep.is_file():
            return reference
        try:
            with np.load(keep, allow_pickle=False) as data:
                rows, kept_identity = data["rows"], str(data["identity"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("drift reference %s not read (%s): collecting it again", keep, exc)
            return reference
        if kept_identity != identity or len(rows) < size or rows.ndim != 2:
            log.info("drift reference %s was made for another student or columns", keep)
            return reference
        reference.rows = np.asarray(rows[:size], dtype=np.float32)
        reference.collected, reference.saved = size, True
        return reference

    @property
    def ready(self) -> bool:
        return self.rows is not None

    def take(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32] | None:
        """Keep what the sample still needs of `rows` (event loop); return the rest (None: all
        kept). A complete reference keeps nothing."""
        if self.rows is not None:
            return rows
        need = self.size - self.collected
        self._parts.append(rows[:need])
        self.collected += min(len(rows), need)
        if self.collected >= self.size:
            self.rows = np.concatenate(self._parts)
            self._parts = []
        rest = rows[need:]
        return rest if len(rest) else None

    def save(self) -> None:
        """Write a complete served reference to `keep` once (blocking; atomic replace). A failure
        is logged: drift goes on with the reference in memory."""
        if self.keep is None or self.saved or self.rows is None:
            return
        self.saved = True
        partial = self.keep.with_name(self.keep.name + ".partial")
        try:
            self.keep.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as file:
                np.savez(file, rows=self.rows, identity=np.array(self.identity))
            partial.replace(self.keep)
        except OSError as exc:
            log.warning("drift reference not kept in %s: %s", self.keep, exc)
            return
        log.info("drift reference kept in %s for the next start", self.keep)

    def describe(self) -> str:
        """ "file <path>", or "first N served rows" (", collecting k/N" until complete; " (kept
        in <path>)" once read back or written)."""
        if self.source != "served":
            return self.source
        collecting = "" if self.ready else f", collecting {self.collected}/{self.size}"
        kept = f" (kept in {self.keep})" if self.saved and self.keep is not None else ""
        return f"first {self.size} served rows{collecting}{kept}"


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, categorical: bool = False) -> float:
    """Population stability index of one column, binned as Evidently 0.7 bins it.

    More than 20 distinct reference values in a numerical column: Sturges bins over both
    samples; else (and always for a `categorical` one) one cell per distinct value of either.
    Empty cells get 1e-4 (or a millionth of the smallest non-empty share when that is <= 1e-4).
    PSI = sum((ref - cur) * ln(ref / cur)); NaNs ignored.
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cur = np.asarray(current, dtype=np.float64).ravel()
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if not categorical and len(np.unique(ref)) > PSI_MAX_CATEGORIES:
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
    current: npt.ArrayLike,
    reference: npt.ArrayLike,
    threshold: float = PSI_THRESHOLD,
    *,
    columns: Sequence[str] | None = None,
    categorical: Collection[str] = (),
) -> DriftResult:
    """Share of columns whose PSI >= `threshold` (pure numpy; the fallback without Evidently)."""
    started = time.perf_counter()
    # float64: Evidently's histograms split each column's range into bins, and a float32 column
    # whose values differ by an ulp (a saturated student's confidence, 1 - 6e-8 .. 1) has a
    # range numpy cannot split ("Too many bins for data range"): every run would fail.
    cur = np.asarray(current, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    names = column_names(ref.shape[1], columns)
    scores = {name: psi(ref[:, i], cur[:, i], name in categorical) for i, name in enumerate(names)}
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


def column_names(count: int, columns: Sequence[str] | None) -> list[str]:
    """`columns`, or input_0 .. input_{count-1} (a table's columns)."""
    return [f"input_{i}" for i in range(count)] if columns is None else list(columns)


def evidently_drift(
    current: npt.ArrayLike,
    reference: npt.ArrayLike,
    method: str = "wasserstein",
    threshold: float | None = None,
    html: bool = True,
    per_column: bool = False,
    *,
    columns: Sequence[str] | None = None,
    categorical: Collection[str] = (),
    categorical_method: str = "psi",
    scored: Collection[str] = (),
) -> DriftResult:
    """Evidently 0.7 drift over all columns; blocking, CPU-bound.

    Columns are numerical (`method`, `threshold`) except those named in `categorical`
    (`categorical_method` at its default threshold: a predicted class). The report holds
    `DriftedColumnsCount` (the share), plus one `ValueDrift` (a score and a distribution plot)
    per column with `per_column` (about 4x the time), else per column named in `scored`.
    A top-level function of plain arguments, so it can run in a child process.
    """
    started = time.perf_counter()
    # float64: Evidently's histograms split each column's range into bins, and a float32 column
    # whose values differ by an ulp (a saturated student's confidence, 1 - 6e-8 .. 1) has a
    # range numpy cannot split ("Too many bins for data range"): every run would fail.
    cur = np.asarray(current, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    names = column_names(ref.shape[1], columns)
    with warnings.catch_warnings():
        # Evidently's own warnings are not ours to act on: it touches the deprecated numpy.core
        # at import, and its correlation widgets divide by the zero variance of constant columns.
        warnings.simplefilter("ignore")
        import pandas as pd
        from evidently import DataDefinition, Dataset, Report
        from evidently.metrics import DriftedColumnsCount, ValueDrift

        definition = DataDefinition(
            numerical_columns=[c for c in names if c not in categorical],
            categorical_columns=[c for c in names if c in categorical],
        )

        def dataset(rows: npt.NDArray[np.generic]) -> Dataset:
            frame = pd.DataFrame(rows, columns=names)
            return Dataset.from_pandas(frame, data_definition=definition)

        def stattest(column: str) -> str:
            return categorical_method if column in categorical else method

        metrics: list[DriftedColumnsCount | ValueDrift] = [
            DriftedColumnsCount(
                num_method=method, num_threshold=threshold, cat_method=categorical_method
            )
        ]
        metrics += [
            ValueDrift(
                column=c,
                method=stattest(c),
                threshold=None if c in categorical else threshold,
            )
            for c in names
            if per_column or c in scored
        ]
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
        columns=len(names),
        rows=len(cur),
        method=method if not categorical else f"{method}; {categorical_method} for categories",
        seconds=time.perf_counter() - started,
        scores=scores,
        html=page,
    )


def compute_drift(
    current: npt.ArrayLike,
    reference: npt.ArrayLike,
    config: DriftConfig,
    *,
    columns: Sequence[str] | None = None,
    categorical: Collection[str] = (),
    scored: Collection[str] = (),
) -> DriftResult:
    """Evidently when installed, else the numpy PSI fallback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # see evidently_drift
            import evidently  # noqa: F401
    except ImportError:
        return numpy_drift(
            current,
            reference,
            config.threshold or PSI_THRESHOLD,
            columns=columns,
            categorical=categorical,
        )
    return evidently_drift(
        current,
        reference,
        config.method,
        config.threshold,
        html=config.html_report,
        per_column=config.report == "columns",
        columns=columns,
        categorical=categorical,
        categorical_method=config.categorical_method,
        scored=scored,
    )


class DriftJob:
    """Periodic drift runs for one model; keeps the latest result and HTML report.

    `reference`: the rows compared against (an array, or a `Reference` that may still be
    collecting: runs wait until it is complete). `features`: the columns' names and kinds (None:
    a table's input_0..). `on_result(model, share, rows)` receives every result (e.g.
    `RecentWindow.set_drift`). `executor`: where `compute_drift` runs; None = in the calling
    worker thread.
    """

    def __init__(
        self,
        model: str,
        buffer: InputBuffer,
        reference: npt.ArrayLike | Reference,
        config: DriftConfig,
        metrics: Metrics,
        *,
        features: DriftFeatures | None = None,
        on_result: Callable[[str, float, int], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.model = model
        self.buffer = buffer
        self.reference = (
            reference if isinstance(reference, Reference) else Reference(reference, source="given")
        )
        self.features = features
        self._config = config
        self._metrics = metrics
        self._on_result = on_result
        self._executor = executor
        self.latest: DriftResult | None = None

    @property
    def latest_html(self) -> bytes | None:
        """The HTML report of the latest run (None before the first run or without Evidently)."""
        return None if self.latest is None else self.latest.html

    def status(self) -> dict[str, Any]:
        """What `GET /v1/slo` shows of this job: status (collecting | waiting | ok), what is
        compared, the reference, rows buffered, and the latest result's figures."""
        reference, latest = self.reference, self.latest
        return {
            "model": self.model,
            "status": "collecting"
            if not reference.ready
            else ("waiting" if latest is None else "ok"),
            "features": "input columns" if self.features is None else self.features.describe(),
            "reference": reference.describe(),
            "reference_rows": reference.collected,
            "buffered_rows": len(self.buffer),
            "min_rows": self._config.min_rows,
            "latest": None
            if latest is None
            else {
                "share": latest.share,
                "drifted": latest.drifted,
                "columns": latest.columns,
                "rows": latest.rows,
                "method": latest.method,
                "scores": latest.scores,
            },
        }

    def run_once(self) -> DriftResult | None:
        """One drift run on the buffered rows (blocking: call from a worker thread).

        Returns None, and changes nothing, while the reference is collecting or fewer than
        `min_rows` rows are buffered.
        """
        reference = self.reference.rows
        if reference is None:
            return None
        self.reference.save()
        current = self.buffer.snapshot()
        if len(current) < self._config.min_rows:
            return None
        features = self.features
        arguments: dict[str, Any] = {}
        if features is not None:
            arguments = {
                "columns": features.columns,
                "categorical": features.categorical,
                "scored": features.predictions,
            }
        if self._executor is None:
            result = compute_drift(current, reference, self._config, **arguments)
        else:
            result = self._executor.submit(
                compute_drift, current, reference, self._config, **arguments
            ).result()
        self.latest = result
        self._metrics.input_drift_share.labels(model=self.model).set(result.share)
        if self._on_result is not None:
            self._on_result(self.model, result.share, result.rows)
        scores = "".join(f", {name} {value:.3g}" for name, value in result.scores.items())
        log.info(
            "drift %s: %d/%d columns drifted over %d rows (%s, %.2f s)%s",
            self.model,
            result.drifted,
            result.columns,
            result.rows,
            result.method,
            result.seconds,
            scores if len(result.scores) <= 4 else "",
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
