import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from kdgate.monitoring.capture import CaptureStore, rows_in_segment


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingStore(CaptureStore):
    writer_threads: list[str]

    def _write(self, arrays: dict[str, np.ndarray], rows: int) -> None:
        self.writer_threads.append(threading.current_thread().name)
        super()._write(arrays, rows)


def _load(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            assert sorted(npz.files) == ["inputs/x", "teacher_kind", "teacher_scores"]
            assert npz["teacher_scores"].dtype == np.float32
            assert len(npz["inputs/x"]) == rows_in_segment(path)
            xs.append(npz["inputs/x"])
            ys.append(npz["teacher_scores"])
    return np.concatenate(xs), np.concatenate(ys)


def test_rotates_segments_and_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(250, 64)).astype(np.float32)
    y = rng.normal(size=(250, 10)).astype(np.float64)  # converted to float32 on append

    async def main() -> list[str]:
        store = RecordingStore(tmp_path / "cap", segment_rows=50, max_rows=120)
        store.writer_threads = []
        for lo in range(0, 250, 10):
            store.append({"x": x[lo : lo + 10]}, y[lo : lo + 10])
        await store.aclose()
        return store.writer_threads

    threads = asyncio.run(main())
    assert threads and all(name.startswith("kdgate-capture") for name in threads)
    files = sorted(p.name for p in (tmp_path / "cap").iterdir())
    assert len(files) == 2, files  # 5 segments of 50 written; beyond 120 rows the oldest go
    assert not [f for f in files if not f.endswith(".npz")]  # no temporary file left behind
    got_x, got_y = _load(tmp_path / "cap")
    np.testing.assert_array_equal(got_x, x[150:])
    np.testing.assert_array_equal(got_y, y[150:].astype(np.float32))


def test_partial_segment_is_written_on_age_and_on_close(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> tuple[int, int]:
        store = CaptureStore(
            tmp_path, segment_rows=1000, max_rows=1000, flush_seconds=30, clock=clock
        )
        store.append({"x": np.ones((3, 4))}, np.zeros((3, 2)))
        await store.drain()
        after_drain = len(store.segments())  # drain flushes
        store.append({"x": np.ones((2, 4))}, np.zeros((2, 2)))
        clock.now = 31.0
        store.append(
            {"x": np.ones((1, 4))}, np.zeros((1, 2))
        )  # the oldest buffered row is 31 s old
        await store.drain()
        on_age = len(store.segments())
        await store.aclose()
        return after_drain, on_age

    assert asyncio.run(main()) == (1, 2)
    assert len(_load(tmp_path)[0]) == 6


def test_rejects_mismatched_rows(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path, segment_rows=10, max_rows=10)
    with pytest.raises(ValueError, match="N rows each"):
        store.append({"x": np.ones((3, 4))}, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="N rows each"):
        store.append({"a": np.ones((2, 4)), "b": np.ones((3, 4))}, np.zeros((2, 2)))
    asyncio.run(store.aclose())


def test_every_input_by_name_any_dtype_readable_without_pickle(tmp_path: Path) -> None:
    """Token ids and masks (INT64), strings (BYTES) and the teacher's probabilities; rows of
    another signature (a longer sequence) start a new segment instead of failing."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, (5, 6)).astype(np.int64)
    mask = np.ones((5, 6), np.int64)
    text = np.array([[b"a"], [b"bc"], [b"def"], [b""], [b"g"]], dtype=object)
    probs = rng.dirichlet(np.ones(3), 5).astype(np.float32)
    longer = rng.integers(0, 50, (2, 9)).astype(np.int64)

    async def main() -> dict[str, object]:
        store = CaptureStore(tmp_path, teacher_kind="probabilities", segment_rows=100, max_rows=100)
        store.append(
            {"input_ids": ids[:3], "attention_mask": mask[:3], "text": text[:3]}, probs[:3]
        )
        store.append(
            {"input_ids": ids[3:], "attention_mask": mask[3:], "text": text[3:]}, probs[3:]
        )
        store.append(
            {"input_ids": longer, "attention_mask": np.ones_like(longer), "text": text[:2]},
            probs[:2],
        )
        await store.aclose()
        return await asyncio.to_thread(store.describe)

    where = asyncio.run(main())
    assert where == {"dir": str(tmp_path.resolve()), "rows": 7, "format": "npz"}
    first, second = sorted(tmp_path.glob("*.npz"))
    with np.load(first, allow_pickle=False) as npz:
        assert sorted(npz.files) == [
            "inputs/attention_mask",
            "inputs/input_ids",
            "inputs/text",
            "teacher_kind",
            "teacher_scores",
        ]
        np.testing.assert_array_equal(npz["inputs/input_ids"], ids)
        assert npz["inputs/input_ids"].dtype == np.int64
        np.testing.assert_array_equal(npz["inputs/attention_mask"], mask)
        assert npz["inputs/text"].tolist() == text.tolist()
        np.testing.assert_array_equal(npz["teacher_scores"], probs)
        assert str(npz["teacher_kind"]) == "probabilities"
    with np.load(second, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inputs/input_ids"], longer)


def test_foreign_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")

    async def main() -> None:
        store = CaptureStore(tmp_path, segment_rows=1, max_rows=1)
        for _ in range(3):
            store.append({"x": np.ones((1, 2))}, np.ones((1, 2)))
        await store.aclose()

    asyncio.run(main())
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert len(list(tmp_path.glob("*.npz"))) == 1
