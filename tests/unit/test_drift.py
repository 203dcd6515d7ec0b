"""Input drift (monitoring/drift.py): numpy PSI against references, Evidently on digits."""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from kdgate.monitoring.drift import (
    DriftConfig,
    DriftJob,
    InputBuffer,
    evidently_drift,
    load_reference,
    load_reference_inputs,
    numpy_drift,
    psi,
)
from kdgate.monitoring.metrics import Metrics


def brute_force_psi(reference: list[float], current: list[float]) -> float:
    """PSI written out with loops, following Evidently's binning rules."""
    distinct = sorted(set(reference))
    if len(distinct) > 20:
        both = reference + current
        lo, hi = min(both), max(both)
        n_bins = math.ceil(math.log2(len(both)) + 1)  # Sturges
        edges = [lo + (hi - lo) * i / n_bins for i in range(n_bins + 1)]

        def cell(x: float) -> int:
            for i in range(n_bins - 1):
                if x < edges[i + 1]:
                    return i
            return n_bins - 1

        cells = list(range(n_bins))
        ref_counts = {c: 0 for c in cells}
        cur_counts = {c: 0 for c in cells}
        for x in reference:
            ref_counts[cell(x)] += 1
        for x in current:
            cur_counts[cell(x)] += 1
    else:
        keys = sorted(set(reference) | set(current))
        ref_counts = {k: reference.count(k) for k in keys}
        cur_counts = {k: current.count(k) for k in keys}
    ref_share = [v / len(reference) for v in ref_counts.values()]
    cur_share = [v / len(current) for v in cur_counts.values()]

    def fill(shares: list[float]) -> list[float]:
        smallest = min(s for s in shares if s > 0)
        filler = smallest / 1e6 if smallest <= 1e-4 else 1e-4
        return [s if s > 0 else filler for s in shares]

    ref_share, cur_share = fill(ref_share), fill(cur_share)
    return sum((r - c) * math.log(r / c) for r, c in zip(ref_share, cur_share, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_psi_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    if seed % 2:  # few distinct values: one cell per value (digits pixels)
        ref = rng.integers(0, 17, 300).astype(float)
        cur = rng.integers(0, 12, 200).astype(float)
    else:  # continuous: Sturges bins
        ref = rng.normal(0, 1, 300)
        cur = rng.normal(0.3 * seed, 1.2, 200)
    assert psi(ref, cur) == pytest.approx(brute_force_psi(ref.tolist(), cur.tolist()), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_psi_matches_evidentlys_implementation(seed: int) -> None:
    pd = pytest.importorskip("pandas")
    with warnings.catch_warnings():  # evidently touches the deprecated numpy.core at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from evidently.legacy.calculations.stattests.psi import _psi
    from evidently.legacy.core import ColumnType

    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 17, 400).astype(float) if seed % 2 else rng.gamma(2, 1, 400)
    cur = np.clip(ref[:250] + rng.normal(0, 2, 250), 0, None)
    theirs, _ = _psi(pd.Series(ref), pd.Series(cur), ColumnType.Numerical, 0.1)
    assert psi(ref, cur) == pytest.approx(theirs, rel=1e-9)


def test_psi_of_identical_constant_columns_is_zero() -> None:
    assert psi(np.zeros(100), np.zeros(50)) == 0.0
    assert psi(np.zeros(100), np.full(50, 16.0)) > 1  # a constant that moved is drift


def test_input_buffer_keeps_the_newest_rows_in_order() -> None:
    buffer = InputBuffer(capacity=5, width=2)
    assert len(buffer) == 0 and buffer.snapshot().shape == (0, 2)
    buffer.append([[0, 0], [1, 1], [2, 2]])
    assert buffer.snapshot()[:, 0].tolist() == [0, 1, 2]
    buffer.append([[3, 3], [4, 4], [5, 5]])
    assert buffer.snapshot()[:, 0].tolist() == [1, 2, 3, 4, 5]
    buffer.append(np.arange(20).reshape(10, 2))  # more than capacity at once
    assert buffer.snapshot()[:, 0].tolist() == [10, 12, 14, 16, 18]
    buffer.append([7, 7])  # a single row
    assert buffer.snapshot()[:, 0].tolist() == [12, 14, 16, 18, 7]


def test_input_buffer_holds_about_capacity_rows_whatever_the_batches() -> None:
    buffer = InputBuffer(capacity=100, width=2)
    appended = 0
    for i in range(5_000):  # batches of 1 to 64 rows, as settles hand them over
        buffer.append(np.full((1 + i % 64, 2), i, dtype=np.float32))
        appended += 1 + i % 64
        held = sum(len(entry) for entry in buffer._entries)
        assert min(appended, 100) <= held < 100 + 64
    expected = [i for i in range(4_990, 5_000) for _ in range(1 + i % 64)][-100:]
    assert buffer.snapshot()[:, 0].tolist() == expected
    buffer = InputBuffer(capacity=3, width=1)
    for _ in range(10):
        buffer.append(np.zeros((0, 1), dtype=np.float32))  # empty batches stay bounded too
    buffer.append([[1.0]])
    assert len(buffer._entries) <= 3 and buffer.snapshot()[:, 0].tolist() == [1.0]


def test_input_buffer_snapshots_while_another_thread_appends() -> None:
    """No lock on append: a concurrent snapshot never fails and never mixes up a row."""
    buffer = InputBuffer(capacity=50, width=3)
    stop = threading.Event()

    def append() -> None:
        i = 0
        while not stop.is_set():
            buffer.append(np.full((1 + i % 3, 3), i, dtype=np.float32))
            i += 1

    writer = threading.Thread(target=append)
    writer.start()
    try:
        for _ in range(2000):
            rows = buffer.snapshot()
            assert len(rows) <= 50
            assert (rows == rows[:, :1]).all()  # every row is one append's value
    finally:
        stop.set()
        writer.join()


def test_input_buffer_trims_a_huge_batch_to_a_copy() -> None:
    buffer = InputBuffer(capacity=4, width=1)
    rows = np.arange(100, dtype=np.float32).reshape(100, 1)
    buffer.append(rows)
    rows[:] = -1  # the caller's array is not referenced: only its last 4 rows, copied
    assert buffer.snapshot()[:, 0].tolist() == [96, 97, 98, 99]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x = load_digits().data.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:400]], x[order[400:1400]]  # reference, held-out current


def test_numpy_drift_clean_vs_inverted(digits) -> None:
    reference, current = digits
    clean = numpy_drift(current[:500], reference)
    inverted = numpy_drift(16 - current[:500], reference)
    assert clean.columns == inverted.columns == 64
    assert clean.share < 0.5 < 0.9 < inverted.share


def test_evidently_clean_vs_inverted(digits) -> None:
    reference, current = digits
    clean = evidently_drift(current, reference, "wasserstein", html=True)
    inverted = evidently_drift(16 - current, reference, "wasserstein", html=False)
    assert clean.columns == 64 and clean.rows == 1000
    assert clean.share < 0.25  # wasserstein does not flag held-out digits
    assert inverted.share > 0.9
    assert clean.html is not None and clean.html.lstrip().lower().startswith(b"<")
    assert inverted.html is None


def test_drift_job_sets_the_gauge_and_reports(tmp_path: Path, digits) -> None:
    reference, current = digits
    np.savez(tmp_path / "reference.npz", inputs=reference, labels=np.zeros(len(reference)))
    metrics = Metrics(CollectorRegistry())
    seen: list[tuple[str, float, int]] = []
    buffer = InputBuffer(capacity=600, width=64)
    job = DriftJob(
        "digits",
        buffer,
        load_reference(tmp_path / "reference.npz"),
        DriftConfig(min_rows=300),
        metrics,
        on_result=lambda *args: seen.append(args),
    )
    buffer.append(16 - current[:200])
    assert job.run_once() is None and job.latest_html is None  # too few rows
    buffer.append(16 - current[200:700])
    result = job.run_once()
    assert result is not None and result.rows == 600
    share = metrics.registry.get_sample_value("kdgate_input_drift_share", {"model": "digits"})
    assert share == result.share > 0.9
    assert seen == [("digits", result.share, 600)]
    assert job.latest_html is not None


def test_reference_inputs_are_read_by_input_name(tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    ids, mask = np.ones((5, 7), np.int64), np.zeros((5, 7), np.int64)
    np.savez(path, input_ids=ids, attention_mask=mask, labels=np.zeros(5))
    arrays = load_reference_inputs(path, ["input_ids", "attention_mask"])
    assert set(arrays) == {"input_ids", "attention_mask"}  # labels are not an input
    np.testing.assert_array_equal(arrays["attention_mask"], mask)
    assert arrays["input_ids"].dtype == np.int64
    with pytest.raises(ValueError, match=r"holds \['input_ids', 'attention_mask', 'labels'\]"):
        load_reference_inputs(path, ["input_ids", "token_type_ids"])
    np.savez(path, inputs=np.zeros((4, 3), np.float32))  # digits' layout: a single input
    assert load_reference_inputs(path, ["input"])["input"].shape == (4, 3)
    np.savez(path, a=np.zeros((4, 3)), b=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="rows"):
        load_reference_inputs(path, ["a", "b"])


def test_a_saturated_confidence_column_is_scored_not_an_error() -> None:
    # A student pushed to certainty answers confidences 1 - 6e-8 .. 1 in float32: numpy cannot
    # split that range into Evidently's histogram bins unless the columns are float64.
    rng = np.random.default_rng(0)
    reference = np.stack([rng.integers(0, 3, 600), rng.uniform(0.5, 1, 600)], 1)
    current = np.zeros((600, 2), dtype=np.float32)
    current[:, 1] = np.float32(1.0) - np.float32(6e-8) * rng.integers(0, 2, 600)
    result = evidently_drift(
        current,
        reference.astype(np.float32),
        columns=["prediction", "confidence"],
        categorical=["prediction"],
        scored=["prediction", "confidence"],
        html=False,
    )
    assert result.share == 1.0
    assert set(result.scores) == {"prediction", "confidence"}
