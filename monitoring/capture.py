"""A bounded on-disk store of recent shadowed (inputs, teacher scores) pairs, for retraining.

Layout — what `kdgate distill --capture DIR` and a user's own pipeline read: a directory of
`.npz` segments (numpy's zip of `.npy` arrays, read with `np.load(path, allow_pickle=False)`), each
holding every input of the shadowed requests by name, the teacher's scores and their kind:

    inputs/<input name>   [N, ...] per input, in the dtype the request sent (BYTES: fixed-width
                          bytes, numpy "S", so no pickled objects are needed)
    teacher_scores        float32 [N, ...]: the teacher's scores output
    teacher_kind          0-d string: "logits", "probabilities" or "regression" (the teacher
                          card's `output_kind`: logits still need a softmax, probabilities do not)

Segments are named `capture-<time_ns>-<rows>.npz`, so name order is age order and the row count
needs no file read. `append` (on the event loop) only buffers copies in memory; a segment is
written when `segment_rows` rows are buffered, the oldest buffered row is `flush_seconds` old, or
rows of another signature (input names, dtypes or shapes beyond the rows, e.g. token sequences of
another length) arrive, on one dedicated writer thread, as a hidden temporary file renamed into
place (a reader never sees a partial segment). After each write the oldest segments are deleted
until at most `max_rows` rows remain. `aclose()` writes what is buffered and stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

log = logging.getLogger(__name__)

SEGMENT_PATTERN = re.compile(r"^capture-(\d{20})-(\d+)\.npz$")
INPUT_PREFIX = "inputs/"
FORMAT = "npz"

Inputs = Mapping[str, NDArray[Any]]


class CaptureStore:
    """Recent (inputs, teacher scores) pairs in `directory`, at most `max_rows` rows on disk.

    `teacher_kind` is the teacher's `output_kind`, stored in every segment.
    """

    def __init__(
        self,
        directory: Path,
        *,
        teacher_kind: str = "logits",
        segment_rows: int = 4096,
        max_rows: int = 100_000,
        flush_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < segment_rows <= max_rows:
            raise ValueError("need 0 < segment_rows <= max_rows")
        self.directory = Path(directory)
        self.teacher_kind = teacher_kind
        self.segment_rows = segment_rows
        self.max_rows = max_rows
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._inputs: list[dict[str, NDArray[Any]]] = []
        self._scores: list[NDArray[np.float32]] = []
        self._signature: tuple[Any, ...] = ()
        self._buffered = 0
        self._oldest = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdgate-capture")
        self._pending: set[Future[None]] = set()
        self._last_ns = 0  # writer thread only: keeps segment names strictly increasing

    def append(self, inputs: Inputs, teacher_scores: ArrayLike) -> None:
        """Buffer pairs (every input by name, [N, ...] each; the teacher's scores [N, ...]);
        never blocks on the disk."""
        y = np.array(teacher_scores, dtype=np.float32)
        x = {name: _storable(rows) for name, rows in inputs.items()}
        if not x or y.ndim == 0 or any(len(a) != len(y) for a in x.values()):
            shapes = {name: a.shape for name, a in x.items()}
            raise ValueError(f"need inputs and scores of N rows each, got {shapes} and {y.shape}")
        # Strings of any width concatenate (to the widest): their width is no part of it.
        kinds = {n: a.dtype.kind if a.dtype.kind == "S" else a.dtype for n, a in x.items()}
        signature = (tuple((n, kinds[n], a.shape[1:]) for n, a in x.items()), y.shape[1:])
        if self._buffered and signature != self._signature:
            self.flush()  # one segment holds one signature, so its arrays concatenate
        self._signature = signature
        if not self._buffered:
            self._oldest = self._clock()
        self._inputs.append(x)
        self._scores.append(y)
        self._buffered += len(y)
        if (
            self._buffered >= self.segment_rows
            or self._clock() - self._oldest >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Hand what is buffered to the writer thread as one segment (no-op when empty)."""
        if not self._buffered:
            return
        arrays = {
            INPUT_PREFIX + name: np.concatenate([x[name] for x in self._inputs])
            for name in self._inputs[0]
        }
        arrays["teacher_scores"] = np.concatenate(self._scores)
        arrays["teacher_kind"] = np.array(self.teacher_kind)
        rows = self._buffered
        self._inputs, self._scores, self._buffered = [], [], 0
        future = self._executor.submit(self._write, arrays, rows)
        self._pending.add(future)
        future.add_done_callback(self._done)

    async def drain(self) -> None:
        """Flush and wait until every segment handed over so far is on disk."""
        self.flush()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in list(self._pending)))

    async def aclose(self) -> None:
        """Flush, wait for the writes, and stop the writer thread."""
        await self.drain()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def describe(self) -> dict[str, Any]:
        """Where the capture is, for the retrain webhook: `{"dir", "rows" (on disk now),
        "format": "npz"}` (blocking: lists the directory)."""
        rows = sum(rows_in_segment(p) for p in self.segments())
        return {"dir": str(self.directory.resolve()), "rows": rows, "format": FORMAT}

    def segments(self) -> list[Path]:
        """Segment files on disk, oldest first (blocking: call from a thread or tests)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if SEGMENT_PATTERN.match(p.name))

    def _done(self, future: Future[None]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("capture segment not written: %s", exc)

    def _write(self, arrays: dict[str, NDArray[Any]], rows: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        name = f"capture-{self._last_ns:020d}-{rows}.npz"
        # A leading dot and no .npz suffix: readers globbing *.npz never see the partial file.
        tmp = self.directory / f".{name}.tmp"
        with tmp.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds poorly
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.directory / name)
        self._prune()

    def _prune(self) -> None:
        segments = self.segments()
        rows = [rows_in_segment(p) for p in segments]
        total = sum(rows)
        for path, n in zip(segments, rows, strict=True):
            if total <= self.max_rows:
                break
            path.unlink(missing_ok=True)
            total -= n


def rows_in_segment(path: Path) -> int:
    """Rows in a capture segment, read from its name (0 for a file that is not a segment)."""
    match = SEGMENT_PATTERN.match(path.name)
    return int(match.group(2)) if match else 0


def _storable(rows: ArrayLike) -> NDArray[Any]:
    """A copy of one input's rows that `np.load(allow_pickle=False)` reads back: strings
    (BYTES, object arrays) become fixed-width bytes."""
    array = np.array(rows)
    if array.dtype == object:
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in array.flat]
        return np.array(flat, dtype=np.bytes_).reshape(array.shape)
    return array
