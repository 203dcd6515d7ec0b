"""Rollout analysis: does a candidate version stay as faithful to the teacher as the incumbent?

The shadow worker feeds a `PairedWindow` one row per shadowed input row, holding both versions'
answers on the same input next to the teacher's (see `add_classification`); `analyse` turns the
window into a decision for the current rollout step: "pass" (next step), "fail" (roll back) or
"wait" (not enough evidence yet).

Checks (`Check.name`), each on the difference candidate - incumbent over the same rows:
- `agreement`: d_i = 1[candidate == teacher] - 1[incumbent == teacher]. Two-sided interval of
  mean(d) at `confidence` by the normal approximation with the paired variance,
  mean ± z * sd(d, ddof=1) / sqrt(n), z the standard normal quantile (`paired_interval`).
  Non-inferiority: pass when low >= -agreement_margin, fail when high < -agreement_margin.
- `kl`: d_i = KL(teacher||candidate) - KL(teacher||incumbent), nats, the same normal interval
  (normal, not Student t, quantile: n is at least `min_samples`, where the two differ by < 0.1 %
  of the width; the stdlib has the normal quantile, scipy is no serving dependency).
  Pass when high <= kl_margin_nats, fail when low > kl_margin_nats.
- `ece` (against the teacher's top-1) and `label_ece` (against labels, present only once the
  window holds >= `min_labels` labelled rows): ECE exactly as `monitoring.fidelity` defines it
  (15 equal-width bins, top-label). ECE is a biased, non-linear statistic with no closed-form
  variance, so its difference gets a paired percentile bootstrap with a fixed seed
  (`BOOTSTRAP_RESAMPLES` resamples; deterministic for the same window). Rows are resampled in
  `BOOTSTRAP_BLOCKS` interleaved blocks (row i in block i mod K), so a resample costs one small
  matrix product whatever the window holds; with fewer rows than blocks it is the ordinary row
  bootstrap. Pass when high <= margin, fail when low > margin.
- `abs_error` (regression windows): mean |version - teacher| per value, paired normal interval;
  the limit is abs_error_margin + abs_error_ratio_margin * incumbent's mean.
- `p95_latency`: nearest-rank P95 of per-request latencies (ms) of each version, point estimates:
  pass when candidate <= incumbent * p95_ratio + p95_slack_ms, else fail; wait while either side
  has fewer than `MIN_LATENCY_SAMPLES`. Reported as difference vs limit = inc * (ratio - 1) + slack.

A check whose interval still straddles its limit waits: a candidate that looks better by less
than the noise is never promoted early. The step's decision is "wait" below `min_samples` rows or
`min_seconds`, whatever the checks say; then a failed check fails it, all passing passes it, and
past `max_seconds` anything still waiting fails it as inconclusive.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdgate.monitoring import fidelity

Outcome = Literal["pass", "fail", "wait"]
Role = Literal["candidate", "incumbent"]
WindowKind = Literal["classification", "regression"]
FloatArray = NDArray[np.float64]

BOOTSTRAP_RESAMPLES = 400
BOOTSTRAP_BLOCKS = 500
BOOTSTRAP_SEED = 20_261_205
MIN_LATENCY_SAMPLES = 20
DEFAULT_CAPACITY = 50_000


class Criteria(BaseModel):
    """Limits of every check (see the module docstring); margins are on candidate - incumbent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    agreement_margin: float = Field(0.01, ge=0.0, lt=1.0)
    kl_margin_nats: float = Field(0.02, ge=0.0)
    ece_margin: float = Field(0.02, ge=0.0, le=1.0)
    label_ece_margin: float = Field(0.03, ge=0.0, le=1.0)
    min_labels: int = Field(200, ge=2)
    p95_ratio: float = Field(1.5, gt=0.0)
    p95_slack_ms: float = Field(2.0, ge=0.0)
    abs_error_margin: float = Field(0.0, ge=0.0)
    abs_error_ratio_margin: float = Field(0.05, ge=0.0)


class StepDefaults(BaseModel):
    """What a step that does not say gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_samples: int = Field(500, ge=1)
    min_seconds: float = Field(60.0, ge=0.0)
    max_seconds: float = Field(1800.0, gt=0.0)


class StepSpec(StepDefaults):
    """One rollout step: the candidate's traffic `weight` (0 = dark) and its evidence bounds."""

    weight: int = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _bounds(self) -> StepSpec:
        if self.max_seconds <= self.min_seconds:
            raise ValueError(
                f"max_seconds {self.max_seconds:g} must exceed min_seconds {self.min_seconds:g}"
            )
        return self

    @property
    def label(self) -> str:
        """The step's name: dark, or the weight as a percentage (25%)."""
        return "dark" if self.weight == 0 else f"{self.weight}%"


_STEP_KEYS = frozenset(StepSpec.model_fields)


def parse_steps(raw: object, defaults: object = None) -> list[StepSpec]:
    """Steps from config/API shorthand: each "dark", an int weight, a mapping with `weight` and
    any of min_samples/min_seconds/max_seconds, or a StepSpec. `defaults` (a mapping or an object
    with those attributes, e.g. the model's rollout settings; None = StepDefaults()) fills what a
    step omits. Weights must increase strictly and end at 100; ValueError says which step."""
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
        raise ValueError("steps must be a list such as [dark, 5, 25, 100]")
    if not raw:
        raise ValueError("steps must not be empty; the last step must have weight 100")
    base = _defaults(defaults)
    steps: list[StepSpec] = []
    for i, item in enumerate(raw):
        step = _step(i, item, base)
        if steps and step.weight <= steps[-1].weight:
            raise ValueError(
                f"steps[{i}]: weight {step.weight} is not above the previous step's "
                f"{steps[-1].weight}; weights must increase strictly"
            )
        steps.append(step)
    if steps[-1].weight != 100:
        raise ValueError(f"the last step must have weight 100 (promotion), got {steps[-1].weight}")
    return steps


def _defaults(defaults: object) -> dict[str, Any]:
    keys = StepDefaults.model_fields
    if defaults is None:
        found: dict[str, Any] = {}
    elif isinstance(defaults, Mapping):
        found = {k: defaults[k] for k in keys if defaults.get(k) is not None}
    else:
        found = {k: getattr(defaults, k) for k in keys if getattr(defaults, k, None) is not None}
    try:
        return StepDefaults(**found).model_dump()
    except ValidationError as exc:
        raise ValueError(f"step defaults: {_first_error(exc)}") from None


def _step(i: int, item: object, base: dict[str, Any]) -> StepSpec:
    if isinstance(item, StepSpec):
        return item
    if isinstance(item, str) and item == "dark":
        fields: dict[str, Any] = {"weight": 0}
    elif isinstance(item, int) and not isinstance(item, bool):
        fields = {"weight": item}
    elif isinstance(item, Mapping):
        unknown = sorted(set(map(str, item)) - _STEP_KEYS)
        if unknown:
            raise ValueError(
                f"steps[{i}]: unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(_STEP_KEYS))}"
            )
        if "weight" not in item:
            raise ValueError(f"steps[{i}]: a step object needs a weight")
        fields = {str(k): v for k, v in item.items()}
        if fields["weight"] == "dark":
            fields["weight"] = 0
    else:
        raise ValueError(
            f"steps[{i}]: {item!r} is not a step; use dark, a weight 0..100 or an object "
            "{weight, min_samples, min_seconds, max_seconds}"
        )
    weight = fields["weight"]
    if not isinstance(weight, int) or isinstance(weight, bool):
        raise ValueError(f"steps[{i}]: weight {weight!r} is not an integer")
    if not 0 <= weight <= 100:
        raise ValueError(f"steps[{i}]: weight {weight} is outside 0..100")
    try:
        return StepSpec(**{**base, **fields})
    except ValidationError as exc:
        raise ValueError(f"steps[{i}]: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(map(str, err["loc"]))
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


class PairedWindow:
    """Bounded ring buffers of paired rows (the newest `capacity`) and per-request latencies.

    An append is a few numpy stores plus one dict entry per request: ~25 µs for a 64-row batch,
    ~17 µs for one row, so the shadow worker can feed it per batch. The rings are fixed at
    construction; the id index holds at most 2 * capacity entries. Thread-safe: the shadow
    worker appends while the rollout driver analyses. A window holds classification or
    regression rows, fixed by `kind` or by the first add.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, kind: WindowKind | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._fixed_kind = kind
        self.kind = kind
        self._lock = threading.Lock()
        self._int = np.zeros((4, capacity), np.int64)  # teacher, candidate, incumbent top-1; label
        self._float = np.zeros((4, capacity), np.float64)  # cand/inc conf, cand/inc KL or error
        self._row_id = np.zeros(capacity, np.int64)  # hash of the row's request id
        self._latency = np.zeros((2, capacity), np.float64)
        self._latencies = [0, 0]
        self._written = 0  # rows ever appended since clear(); the ring holds the newest
        # hash(request id) -> absolute row number of its first row (may be evicted by now).
        self._index: dict[int, int] = {}

    @property
    def samples(self) -> int:
        """Paired rows held."""
        return min(self._written, self.capacity)

    @property
    def labelled(self) -> int:
        """Rows held that have a label."""
        with self._lock:
            return int((self._int[3, : self.samples] >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the ring buffers (fixed at construction)."""
        arrays = (self._int, self._float, self._row_id, self._latency)
        return sum(a.nbytes for a in arrays)

    def add_classification(
        self,
        *,
        teacher_top1: ArrayLike,
        candidate_top1: ArrayLike,
        incumbent_top1: ArrayLike,
        candidate_conf: ArrayLike,
        incumbent_conf: ArrayLike,
        candidate_kl: ArrayLike,
        incumbent_kl: ArrayLike,
        request_ids: str | Sequence[str],
    ) -> None:
        """Append one row per input row: top-1 classes, top-class probabilities in [0, 1],
        KL(teacher||version) in nats. `request_ids`: one per row (the rows of a multi-row request
        repeat its id, consecutively) or one id for all rows."""
        ints = [np.asarray(a, np.int64).reshape(-1) for a in (teacher_top1, candidate_top1)]
        ints.append(np.asarray(incumbent_top1, np.int64).reshape(-1))
        floats = [
            np.asarray(a, np.float64).reshape(-1)
            for a in (candidate_conf, incumbent_conf, candidate_kl, incumbent_kl)
        ]
        self._append("classification", ints, floats, request_ids)

    def add_regression(
        self,
        *,
        candidate_abs_error: ArrayLike,
        incumbent_abs_error: ArrayLike,
        request_ids: str | Sequence[str],
    ) -> None:
        """Append one row per predicted value: |version - teacher| of each version."""
        floats = [
            np.asarray(a, np.float64).reshape(-1)
            for a in (candidate_abs_error, incumbent_abs_error)
        ]
        self._append("regression", [], floats, request_ids)

    def add_latency(self, version_role: Role, ms: float) -> None:
        """One request's latency of the candidate or the incumbent, in milliseconds."""
        side = 0 if version_role == "candidate" else 1
        with self._lock:
            self._latency[side, self._latencies[side] % self.capacity] = ms
            self._latencies[side] += 1

    def attach_label(self, request_id: str, label: int | Sequence[int]) -> bool:
        """Label the rows of a request still held: an int for a one-row request, one per row
        otherwise. False (nothing stored) for an id not held (never added, evicted, cleared), a
        regression window, a label count that does not match the rows, or a negative label."""
        labels = [label] if isinstance(label, int) else list(label)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in labels):
            return False
        h = hash(request_id)
        with self._lock:
            start = self._index.get(h, -1)
            if self.kind != "classification" or start < self._written - self.capacity:
                return False
            rows = self._rows_of(h, start)
            if len(rows) != len(labels):
                return False
            self._int[3, rows] = labels
            return True

    def clear(self) -> None:
        """Forget every row, label and latency (a new step starts a new window)."""
        with self._lock:
            self._written = 0
            self._latencies = [0, 0]
            self._index.clear()
            self.kind = self._fixed_kind

    def snapshot(self) -> WindowSnapshot:
        """A consistent copy of the rows held, oldest first."""
        cap = self.capacity
        with self._lock:
            return WindowSnapshot(
                self.kind,
                _in_order(self._int, self._written, cap),
                _in_order(self._float, self._written, cap),
                _in_order(self._latency[0], self._latencies[0], cap),
                _in_order(self._latency[1], self._latencies[1], cap),
            )

    def _append(
        self,
        kind: WindowKind,
        ints: list[NDArray[np.int64]],
        floats: list[FloatArray],
        request_ids: str | Sequence[str],
    ) -> None:
        n = len(floats[0])
        if any(len(a) != n for a in (*ints, *floats)):
            raise ValueError("every column of a paired append needs the same number of rows")
        ids = [request_ids] * n if isinstance(request_ids, str) else list(request_ids)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} request ids for {n} rows")
        hashes = np.fromiter(map(hash, ids), np.int64, n)
        # The first row of each request (a multi-row request repeats its id on its rows).
        first = np.ones(n, bool)
        np.not_equal(hashes[1:], hashes[:-1], out=first[1:])
        firsts = np.flatnonzero(first)
        keep = slice(max(0, n - self.capacity), n)  # more rows than capacity: the newest
        with self._lock:
            if self.kind is None:
                self.kind = kind
            elif self.kind != kind:
                raise ValueError(f"a {self.kind} window cannot take {kind} rows")
            slots = np.arange(self._written + keep.start, self._written + n) % self.capacity
            for row, col in enumerate(ints):
                self._int[row, slots] = col[keep]
            self._int[3, slots] = -1
            for row, values in enumerate(floats):
                self._float[row, slots] = values[keep]
            self._row_id[slots] = hashes[keep]
            self._index.update(
                zip(hashes[firsts].tolist(), (firsts + self._written).tolist(), strict=True)
            )
            self._written += n
            if len(self._index) > 2 * self.capacity:
                # Ids of rows that left the ring, dropped in bulk: amortised O(1) per request,
                # and the index never holds more than twice the ring's rows.
                oldest = self._written - self.capacity
                self._index = {h: at for h, at in self._index.items() if at >= oldest}

    def _rows_of(self, h: int, start: int) -> list[int]:
        # A request's rows are consecutive, from `start` to the first row of another id.
        rows = []
        for absolute in range(start, self._written):
            slot = absolute % self.capacity
            if self._row_id[slot] != h:
                break
            rows.append(slot)
        return rows


def _in_order(ring: NDArray[Any], written: int, capacity: int) -> NDArray[Any]:
    # The entries a ring (along its last axis) holds after `written` appends, oldest first.
    if written <= capacity:
        return ring[..., :written].copy()
    start = written % capacity
    return np.concatenate((ring[..., start:], ring[..., :start]), axis=-1)


class WindowSnapshot(NamedTuple):
    """Rows of a window, oldest first: `ints` [4, n] (teacher, candidate, incumbent top-1,
    label or -1), `floats` [4, n] (candidate/incumbent confidence, KL; or regression errors in
    rows 0-1), and each version's latencies in ms."""

    kind: WindowKind | None
    ints: NDArray[np.int64]
    floats: FloatArray
    candidate_ms: FloatArray
    incumbent_ms: FloatArray


class Interval(NamedTuple):
    """A point estimate and its two-sided interval."""

    estimate: float
    low: float
    high: float


class Check(NamedTuple):
    """One check's figures: candidate, incumbent, difference (candidate - incumbent), its
    interval `low`..`high`, the `limit` it is held to (see the module docstring); NaN where a
    side has no data."""

    name: str
    candidate: float
    incumbent: float
    difference: float
    low: float
    high: float
    limit: float
    outcome: Outcome

    def describe(self) -> str:
        """One line with the figures."""
        return (
            f"{self.name} {self.outcome}: candidate {self.candidate:.4g} vs incumbent "
            f"{self.incumbent:.4g}, difference {self.difference:+.4g} "
            f"(interval {self.low:+.4g} to {self.high:+.4g}, limit {self.limit:+.4g})"
        )


class Analysis(NamedTuple):
    """The step's decision, the rows it rests on, every check and one line naming the reason."""

    decision: Outcome
    samples: int
    checks: list[Check]
    reason: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and infinities as None)."""
        return {
            "decision": self.decision,
            "samples": self.samples,
            "reason": self.reason,
            "checks": [{k: _finite(v) for k, v in c._asdict().items()} for c in self.checks],
        }


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def z_quantile(confidence: float) -> float:
    """Two-sided standard normal quantile: z with P(|Z| <= z) = confidence."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def paired_interval(candidate: ArrayLike, incumbent: ArrayLike, confidence: float) -> Interval:
    """Mean of candidate - incumbent over paired rows with the normal-approximation interval
    mean ± z * sd(ddof=1) / sqrt(n); NaN interval below 2 rows."""
    d = np.asarray(candidate, np.float64) - np.asarray(incumbent, np.float64)
    n = d.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan)
    half = z_quantile(confidence) * float(d.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def ece_difference(
    candidate_conf: ArrayLike,
    candidate_hit: ArrayLike,
    incumbent_conf: ArrayLike,
    incumbent_hit: ArrayLike,
    confidence: float,
) -> tuple[float, float, Interval]:
    """ECE of each version (`fidelity.ece`) and the paired block-bootstrap percentile interval of
    candidate - incumbent (fixed seed; see the module docstring)."""
    sides = [
        (np.asarray(c, np.float64).reshape(-1), np.asarray(h, np.float64).reshape(-1))
        for c, h in ((candidate_conf, candidate_hit), (incumbent_conf, incumbent_hit))
    ]
    ece_c, ece_i = (fidelity.ece(fidelity.calibration(c, h)) for c, h in sides)
    n = sides[0][0].size
    if n < 2:
        return ece_c, ece_i, Interval(ece_c - ece_i, math.nan, math.nan)
    bins = fidelity.CALIBRATION_BINS
    blocks = min(n, BOOTSTRAP_BLOCKS)
    block = np.arange(n) % blocks
    # Per block: each side's per-bin sum of (correct - confidence), and its row count; ECE is
    # sum_bin |that sum| / rows, and both versions share the rows (paired).
    columns = [
        np.bincount(
            block * bins + fidelity.bin_index(conf), weights=hit - conf, minlength=blocks * bins
        ).reshape(blocks, bins)
        for conf, hit in sides
    ]
    per_block = np.hstack((*columns, np.bincount(block, minlength=blocks)[:, None]))
    # einsum's own loop rather than BLAS: a threaded GEMM on a busy 2-core host took 10x longer
    # (11.5 ms against 1.1 ms single-threaded) and competes with the requests for the cores.
    resampled = np.einsum("rk,kc->rc", _bootstrap_weights(blocks), per_block)
    rows = resampled[:, -1]
    eces = [np.abs(resampled[:, k * bins : (k + 1) * bins]).sum(axis=1) / rows for k in (0, 1)]
    alpha = 1.0 - confidence
    low, high = np.quantile(eces[0] - eces[1], [alpha / 2.0, 1.0 - alpha / 2.0])
    return ece_c, ece_i, Interval(ece_c - ece_i, float(low), float(high))


@functools.lru_cache(maxsize=4)
def _bootstrap_weights(blocks: int) -> FloatArray:
    # How often each resample draws each block: fixed by the seed, so built once per block count
    # (a full window always has BOOTSTRAP_BLOCKS) and shared, read-only.
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = rng.integers(0, blocks, size=(BOOTSTRAP_RESAMPLES, blocks))
    offsets = np.arange(BOOTSTRAP_RESAMPLES)[:, None] * blocks
    counts = np.bincount((draws + offsets).reshape(-1), minlength=BOOTSTRAP_RESAMPLES * blocks)
    weights = counts.reshape(BOOTSTRAP_RESAMPLES, blocks).astype(np.float64)
    weights.setflags(write=False)
    return weights


def p95_nearest_rank(values: ArrayLike) -> float:
    """The nearest-rank 95th percentile: the ceil(0.95 n)-th smallest value; NaN when empty."""
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
        return math.nan
    k = (95 * x.size + 99) // 100  # ceil(0.95 n) in integers, free of float rounding
    return float(np.partition(x, k - 1)[k - 1])


def _interval_check(
    name: str, cand: float, inc: float, iv: Interval, limit: float, *, lower_bound: bool = False
) -> Check:
    # Upper-bound checks hold difference <= limit, the lower-bound one (agreement) >= limit.
    if math.isnan(iv.low) or math.isnan(iv.high):
        outcome: Outcome = "wait"
    elif lower_bound:
        outcome = "pass" if iv.low >= limit else "fail" if iv.high < limit else "wait"
    else:
        outcome = "pass" if iv.high <= limit else "fail" if iv.low > limit else "wait"
    return Check(name, cand, inc, iv.estimate, iv.low, iv.high, limit, outcome)


def _ece_check(name: str, conf: FloatArray, hits: list[NDArray[np.bool_]], c: Criteria) -> Check:
    margin = c.ece_margin if name == "ece" else c.label_ece_margin
    ece_c, ece_i, iv = ece_difference(conf[0], hits[0], conf[1], hits[1], c.confidence)
    return _interval_check(name, ece_c, ece_i, iv, margin)


def _latency_check(snap: WindowSnapshot, c: Criteria) -> Check:
    cand, inc = p95_nearest_rank(snap.candidate_ms), p95_nearest_rank(snap.incumbent_ms)
    diff, limit = cand - inc, inc * (c.p95_ratio - 1.0) + c.p95_slack_ms
    few = min(snap.candidate_ms.size, snap.incumbent_ms.size) < MIN_LATENCY_SAMPLES
    outcome: Outcome = "wait" if few else "pass" if diff <= limit else "fail"
    return Check("p95_latency", cand, inc, diff, diff, diff, limit, outcome)


def _checks(snap: WindowSnapshot, c: Criteria) -> list[Check]:
    f = snap.floats
    if snap.kind == "regression":
        iv = paired_interval(f[0], f[1], c.confidence)
        inc = float(f[1].mean()) if f.shape[1] else math.nan
        cand = float(f[0].mean()) if f.shape[1] else math.nan
        limit = c.abs_error_margin + c.abs_error_ratio_margin * (0.0 if math.isnan(inc) else inc)
        return [_interval_check("abs_error", cand, inc, iv, limit), _latency_check(snap, c)]
    teacher, cand_top, inc_top, label = snap.ints
    agree = [cand_top == teacher, inc_top == teacher]
    mean = [float(a.mean()) if a.size else math.nan for a in agree]
    iv = paired_interval(agree[0], agree[1], c.confidence)
    margin = -c.agreement_margin
    checks = [_interval_check("agreement", mean[0], mean[1], iv, margin, lower_bound=True)]
    kl = paired_interval(f[2], f[3], c.confidence)
    kl_mean = [float(k.mean()) if k.size else math.nan for k in f[2:4]]
    checks.append(_interval_check("kl", kl_mean[0], kl_mean[1], kl, c.kl_margin_nats))
    checks.append(_ece_check("ece", f[:2], agree, c))
    known = label >= 0
    if int(known.sum()) >= c.min_labels:
        hits = [cand_top[known] == label[known], inc_top[known] == label[known]]
        checks.append(_ece_check("label_ece", f[:2, known], hits, c))
    checks.append(_latency_check(snap, c))
    return checks


def analyse(
    window: PairedWindow,
    criteria: Criteria,
    *,
    min_samples: int,
    elapsed_seconds: float,
    min_seconds: float,
    max_seconds: float,
) -> Analysis:
    """Decide the current step from the window (see the module docstring for the rules)."""
    snap = window.snapshot()
    n = snap.floats.shape[1]
    checks = _checks(snap, criteria)
    waiting = [ch.name for ch in checks if ch.outcome == "wait"]
    failed = [ch for ch in checks if ch.outcome == "fail"]
    over = elapsed_seconds >= max_seconds
    if n < min_samples or elapsed_seconds < min_seconds:
        evidence = (
            f"{n} of {min_samples} samples, {elapsed_seconds:.0f} of {min_seconds:.0f} s minimum"
        )
        if over:
            return Analysis(
                "fail", n, checks, f"inconclusive after {elapsed_seconds:.0f} s: {evidence}"
            )
        return Analysis("wait", n, checks, f"waiting for evidence: {evidence}")
    if failed:
        return Analysis("fail", n, checks, failed[0].describe())
    if not waiting:
        return Analysis("pass", n, checks, f"all checks passed on {n} samples")
    undecided = f"{', '.join(waiting)} undecided on {n} samples"
    if over:
        return Analysis(
            "fail", n, checks, f"inconclusive after {elapsed_seconds:.0f} s: {undecided}"
        )
    return Analysis("wait", n, checks, f"waiting: {undecided}")
