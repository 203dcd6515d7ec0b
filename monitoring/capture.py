"""A bounded on-disk store of recent shadowed (input, teacher logits) pairs, for retraining.

Layout — exactly what `kdgate distill --capture DIR` reads: a directory of `.npz` segments, each
with two arrays and no pickled objects:

    inputs          float32 [N, D]
    teacher_logits  float32 [N, C]

Segments are named `capture-<time_ns>-<rows>.npz`, so name order is age order and the row count
needs no file read. `append` (on the event loop) only buffers copies in memory; a segment is
written when `segment_rows` rows are buffered or the oldest buffered row is `flush_seconds` old,
on one dedicated writer thread, as a hidden temporary file renamed into place (a reader never
sees a partial segment). After each write the oldest segments are deleted until at most
`max_rows` rows remain. `aclose()` writes what is buffered and stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

log = logging.getLogger(__name__)

SEGMENT_PATTERN = re.compile(r"^capture-(\d{20})-(\d+)\.npz$")


class CaptureStore:
    """Recent (input, teacher logits) pairs in `directory`, at most `max_rows` rows on disk."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_rows: int = 4096,
        max_rows: int = 100_000,
        flush_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < segment_rows <= max_rows:
            raise ValueError("need 0 < segment_rows <= max_rows")
        self.directory = Path(directory)
        self.segment_rows = segment_rows
        self.max_rows = max_rows
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._inputs: list[NDArray[np.float32]] = []
        self._logits: list[NDArray[np.float32]] = []
        self._buffered = 0
        self._oldest = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdgate-capture")
        self._pending: set[Future[None]] = set()
        self._last_ns = 0  # writer thread only: keeps segment names strictly increasing

    def append(self, inputs: ArrayLike, teacher_logits: ArrayLike) -> None:
        """Buffer pairs (inputs [N, D], teacher logits [N, C]); never blocks on the disk."""
        x = np.array(inputs, dtype=np.float32, ndmin=2)
        y = np.array(teacher_logits, dtype=np.float32, ndmin=2)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"need [N, D] inputs and [N, C] logits, got {x.shape} and {y.shape}")
        if self._inputs and (x.shape[1], y.shape[1]) != (
            self._inputs[0].shape[1],
            self._logits[0].shape[1],
        ):
            raise ValueError("row width changed within a segment")
        if not self._buffered:
            self._oldest = self._clock()
        self._inputs.append(x)
        self._logits.append(y)
        self._buffered += len(x)
        if (
            self._buffered >= self.segment_rows
            or self._clock() - self._oldest >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Hand what is buffered to the writer thread as one segment (no-op when empty)."""
        if not self._buffered:
            return
        inputs = np.concatenate(self._inputs)
        logits = np.concatenate(self._logits)
        self._inputs, self._logits, self._buffered = [], [], 0
        future = self._executor.submit(self._write, inputs, logits)
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

    def segments(self) -> list[Path]:
        """Segment files on disk, oldest first (blocking: call from a thread or tests)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if SEGMENT_PATTERN.match(p.name))

    def _done(self, future: Future[None]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("capture segment not written: %s", exc)

    def _write(self, inputs: NDArray[np.float32], logits: NDArray[np.float32]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        name = f"capture-{self._last_ns:020d}-{len(inputs)}.npz"
        # A leading dot and no .npz suffix: readers globbing *.npz never see the partial file.
        tmp = self.directory / f".{name}.tmp"
        with tmp.open("wb") as f:
            np.savez(f, inputs=inputs, teacher_logits=logits)
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
