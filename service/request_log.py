"""The request log: every answered inference request, settled in bulk into its consumers.

    log = RequestLog(consumers=[request_metrics, monitoring])   # built once, in create_app
    reply.after()  ->  log.record((protocol, model, ...))       # per request: one append
    log.settle()                                                # the read barrier, any thread

The request path only appends a `Served` row; the log settles its rows into the consumers every
`ROWS` requests, at most `SECONDS` after the first unsettled one, and before anything reads the
results (a Prometheus collect, the feedback API, shutdown). Measured at c16 (docs/benchmarks.md),
the same bookkeeping done request by request cost ~55 us of server CPU per request, ~13 us of it
the work itself and the rest the caches it evicted from under the request path; in bulk, ~2 us.

A consumer says where it may run (`Consumer.any_thread`). `settle()` is correct from any thread:
it takes the rows under a lock and hands them at once to the `any_thread` consumers (the request
metrics: a collect on a scrape's thread sees every request answered before it began), while the
others (shadow queue, feedback store, drift buffers: event-loop objects) receive them on the
event loop, in order — directly when settle runs there, else at the loop's next turn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from kdgate.service.routing import Variant

log = logging.getLogger(__name__)

Arrays = Mapping[str, Any]

ROWS = 64  # settle once this many requests wait...
SECONDS = 0.01  # ...or this long after the first unsettled one


class Served(NamedTuple):
    """One answered inference request."""

    protocol: str  # "v2" | "v1"
    model: str  # as the URL named it (may be unknown)
    variant: Variant | None  # None: no variant was picked (unknown model, not ready, ...)
    status: int  # HTTP status answered
    started: float  # perf_counter at the start of the request
    request_id: str
    inputs: Arrays  # decoded inputs (empty when decoding failed)
    outputs: Arrays | None  # the student's outputs of a 200, else None
    trace: Any  # the request span's context when tracing is on, for the shadow link; else None
    answered: float  # perf_counter once the response was sent


class Consumer(Protocol):
    """Receives answered requests in bulk, oldest first."""

    # True: `consume` may run on any thread (it guards its own state); False: event loop only.
    any_thread: bool

    def consume(self, rows: Sequence[Served]) -> None: ...


class RequestLog:
    """Answered requests waiting to be settled into `consumers` (see the module doc)."""

    def __init__(
        self, consumers: Sequence[Consumer], *, rows: int = ROWS, seconds: float = SECONDS
    ) -> None:
        self._anywhere = tuple(c for c in consumers if c.any_thread)
        self._on_loop = tuple(c for c in consumers if not c.any_thread)
        self._max_rows = rows
        self._seconds = seconds
        # Never replaced, only appended to (event loop) and cut from the front (`_take`, any
        # thread): each is one atomic list operation, so recording takes no lock and no row
        # appended meanwhile is lost. `_lock` orders the settlers among themselves.
        self._rows: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._for_loop: list[Served] = []  # settled for `_anywhere`, not yet for `_on_loop`
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def __len__(self) -> int:
        """Requests answered and not settled yet."""
        return len(self._rows)

    def record(self, served: tuple[Any, ...]) -> None:
        """Log an answered request: the fields of its `Served` row, in order (a plain tuple:
        making the NamedTuple costs ~1 us a row one at a time, ~0.3 us in bulk at settle);
        settle when `rows` wait, else within `seconds`."""
        rows = self._rows
        rows.append(served)
        if len(rows) >= self._max_rows:
            self.settle()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a synchronous caller): settle now
                self.settle()
                return
            self._loop, self._loop_thread = loop, threading.get_ident()
            self._timer = loop.call_later(self._seconds, self.settle)

    def settle(self) -> None:
        """Settle every request answered so far (the read barrier; any thread)."""
        on_loop = self._loop_thread is None or threading.get_ident() == self._loop_thread
        if on_loop and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            rows = self._take()
            if rows:
                _deliver(self._anywhere, rows)
            if not self._on_loop:
                return
            if not on_loop:
                self._for_loop.extend(rows)
                loop = self._loop
                if rows and loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(self.settle)
                return
            rows, self._for_loop = self._for_loop + rows, []
        if rows:
            _deliver(self._on_loop, rows)

    def _take(self) -> list[Served]:
        rows = self._rows
        taken = rows[: len(rows)]
        del rows[: len(taken)]
        return list(map(_as_served, taken))


# tuple.__new__ with the class: a Served without running its Python-level __new__.
_as_served = partial(tuple.__new__, Served)


def _deliver(consumers: Sequence[Consumer], rows: list[Served]) -> None:
    for consumer in consumers:
        try:
            consumer.consume(rows)
        except Exception:  # bookkeeping must never fail the server; say so and go on
            log.exception("%s failed to settle %d answered requests", consumer, len(rows))
