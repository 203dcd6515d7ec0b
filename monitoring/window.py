"""A sliding time window of additive vectors, kept as a ring of fixed-width time buckets.

Anything that sums — counts, sums of KL, per-bin calibration sums, latency histogram buckets —
is packed into one float64 vector of `width` entries; `add` adds a vector to the current bucket
and `total` sums the buckets still inside the window. Both cost O(buckets * width), independent
of traffic, and memory is fixed at `buckets * width` floats.

The window covers the current (partial) bucket plus the `buckets - 1` before it, where
`buckets = ceil(window_seconds / bucket_seconds)`: between `window_seconds - bucket_seconds` and
`window_seconds` of history, depending on where in its bucket "now" falls. Buckets are aligned to
multiples of `bucket_seconds` on the injected clock (monotonic by default).

Not thread-safe: use one window from one thread (the event loop).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray


class BucketedWindow:
    """Sliding window of `width`-long float64 vectors over the last `window_seconds`."""

    def __init__(
        self,
        width: int,
        *,
        window_seconds: float,
        bucket_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if width < 1:
            raise ValueError("width must be at least 1")
        if bucket_seconds <= 0 or window_seconds < bucket_seconds:
            raise ValueError("need 0 < bucket_seconds <= window_seconds")
        self.width = width
        self.window_seconds = float(window_seconds)
        self.bucket_seconds = float(bucket_seconds)
        self._clock = clock
        buckets = math.ceil(window_seconds / bucket_seconds)
        self._data = np.zeros((buckets, width), dtype=np.float64)
        # Which absolute bucket number each slot holds; -1 marks a slot never used.
        self._epoch = np.full(buckets, -1, dtype=np.int64)

    @property
    def buckets(self) -> int:
        """Number of buckets in the ring."""
        return len(self._epoch)

    def add(self, values: ArrayLike) -> None:
        """Add `values` (a vector of `width`) to the bucket of the current time."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (self.width,):
            raise ValueError(f"expected a vector of {self.width}, got shape {v.shape}")
        self._data[self._current_slot()] += v

    def total(self) -> NDArray[np.float64]:
        """Sum of the vectors added within the window (a fresh array of `width`)."""
        now = self._bucket_number()
        live = self._epoch > now - self.buckets
        out: NDArray[np.float64] = self._data[live].sum(axis=0)
        return out

    def clear(self) -> None:
        """Forget everything."""
        self._data[:] = 0.0
        self._epoch[:] = -1

    def _bucket_number(self) -> int:
        return math.floor(self._clock() / self.bucket_seconds)

    def _current_slot(self) -> int:
        now = self._bucket_number()
        slot = now % self.buckets
        if self._epoch[slot] != now:
            self._data[slot] = 0.0
            self._epoch[slot] = now
        return slot
