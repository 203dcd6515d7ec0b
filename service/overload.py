"""Overload protection of the inference routes: an in-flight limit and a request deadline.

    Guard.serve(protocol, model, version, headers, receive)
    ├── in_flight >= max_in_flight  -> 503 + Retry-After at once, the student never sees it
    ├── Inference.handle(...)        -> its Reply
    └── still running after request_timeout_seconds -> cancelled, 503 + Retry-After

Both refusals are JSON errors counted in `kdgate_requests_total{code="503"}` (version "", as
other requests no variant answered), the way Triton and KServe shed load: a client or a load
balancer retries elsewhere or later instead of queueing behind a saturated replica.

Costs on the request path (measured: ~0.3 us per request for the limit, ~0.9 us with the
deadline, against ~100 us for the request): the limit is an int compared, incremented and
decremented; the deadline a clock read and one dict insert and delete keyed by the request's
task (no timer armed per request: `asyncio.timeout` costs ~9 us here). One timer, running only
while requests are in flight, sweeps every `timeout / 4` s (at most 1 s), so a deadline is
honoured within one sweep period after it. It cancels the request's task at its current `await`
(the body being read, a micro-batch being waited for). A student run on the event loop cannot
be interrupted: requests batched behind a slow run answer 503 once it ends.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio import current_task
from collections.abc import Iterable
from time import monotonic, perf_counter
from typing import Any

from kdgate.service.errors import error_body
from kdgate.service.inference import (
    JSON,
    MODEL_VERSION,
    NO_VERSION,
    REQUEST_ID,
    Inference,
    Receive,
    Reply,
    ServedSoFar,
    new_request_id,
)
from kdgate.service.protocol_v2 import valid_request_id
from kdgate.service.state import ServingState

RETRY_AFTER_SECONDS = 1  # a replica frees a slot within milliseconds; tell clients to come back


class Guard:
    """In-flight limit and deadline around `inference.handle` (see the module doc).

    `max_in_flight` 0 and `timeout_seconds` 0 turn each off. Not thread-safe: one event loop.
    """

    def __init__(
        self,
        inference: Inference,
        state: ServingState,
        *,
        max_in_flight: int,
        timeout_seconds: float,
    ) -> None:
        self.inference = inference
        self.state = state
        self.limit = max_in_flight or sys.maxsize
        self.timeout = timeout_seconds
        self.in_flight = 0
        self._period = min(max(timeout_seconds / 4, 0.01), 1.0)
        self._started: dict[asyncio.Task[Any], float] = {}  # task -> start, in start order
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(
        self,
        protocol: str,
        model: str,
        version: str | None,
        raw_headers: Iterable[tuple[bytes, bytes]],
        receive: Receive,
    ) -> Reply:
        """`inference.handle`'s Reply, or a 503 Reply when over the limit or the deadline."""
        if self.in_flight >= self.limit:
            return self.refusal(
                protocol,
                model,
                raw_headers,
                f"server busy: {self.in_flight} inference requests in flight "
                f"(server.max_in_flight); retry after {RETRY_AFTER_SECONDS} s",
            )
        if not self.timeout:
            self.in_flight += 1
            try:
                # `inference` is the plain or the traced handler, as create_app chose.
                return await self.inference.handle(protocol, model, version, raw_headers, receive)
            finally:
                self.in_flight -= 1
        loop = self._loop or asyncio.get_running_loop()
        # current_task(loop) skips the running-loop lookup of current_task() (~0.2 us of ~0.45).
        task = current_task(loop)
        if task is None:  # first request on a new event loop: the old one's timer is gone
            loop = asyncio.get_running_loop()
            task = current_task(loop)
            assert task is not None
            self._sweeper = None
        self._loop = loop
        self.in_flight += 1
        self._started[task] = monotonic()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._period, self._sweep)
        try:
            return await self.inference.handle(protocol, model, version, raw_headers, receive, task)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # not ours: the server is shutting down
            task.uncancel()
            return self.refusal(
                protocol,
                model,
                raw_headers,
                f"request deadline of {self.timeout:g} s exceeded (server.request_timeout_seconds)",
            )
        finally:
            self.in_flight -= 1
            del self._started[task]
            if self._expired:
                self._expired.discard(task)

    def refusal(
        self, protocol: str, model: str, raw_headers: Iterable[tuple[bytes, bytes]], message: str
    ) -> Reply:
        """A 503 JSON error with Retry-After, counted when the front door calls `after`."""
        request_id = dict(raw_headers).get(REQUEST_ID, b"").decode("latin-1")
        if not valid_request_id(request_id):
            request_id = new_request_id()
        body = error_body(message)
        headers = [
            (b"content-type", JSON),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
            (MODEL_VERSION, NO_VERSION),
            (REQUEST_ID, request_id.encode()),
        ]
        # Counted like any request no variant answered (version ""), by the request log.
        served: ServedSoFar = (
            protocol,
            model,
            None,
            503,
            perf_counter(),
            request_id,
            {},
            None,
            None,
        )
        return Reply(503, headers, body, self.inference.log, served)

    def _sweep(self) -> None:
        """Cancel the requests past their deadline; run again while any is in flight."""
        cutoff = monotonic() - self.timeout
        for task, started in self._started.items():
            if started > cutoff:
                break  # insertion order is start order: the rest are younger
            if task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._sweeper = None
        if self._started and self._loop is not None:
            self._sweeper = self._loop.call_later(self._period, self._sweep)
