"""Zero-delay adaptive micro-batching: requests ready in the same event-loop iteration share a run.

    nothing ran yet in this loop iteration  -> run inline (no wait), mark the iteration busy
    the iteration is busy, or a batch waits -> join the batch and await its rows
    the last batch had company (saturated)  -> join the batch, even as the iteration's first
    loop.call_soon(flush)                   -> one session run over the joined rows, split back

There is no timer and no delay. A saturated server gets several requests in one loop iteration
(uvloop hands it every readable socket of an epoll round at once); the first runs inline, the
others, already queued to run before the flush callback, join one batch. Once an iteration has
had several requests, the next iteration's first joins the batch too: one run per iteration
instead of two (wrk at c16 against the digits student: 3.4 requests per session run when each
iteration's first ran inline, 7.4 this way, and ~10 % less server CPU per request). A batch of
one request ends that: the load went down, and the next lone request runs inline again. A lone
request (one connection, or a modest arrival rate) therefore runs inline, so its latency does
not change; at most one request after a busy spell pays a batch's extra loop turn. Why it
pays for this model class (docs/benchmarks.md): a run of the digits student costs ~20 us at
batch 1 and ~26 us at batch 16 in a `timeit` loop, and 2-3x more between two requests in a busy
server, where its weights and code have left the CPU caches.

Only single-input models whose input and outputs have a dynamic first (batch) dimension batch;
the others always run inline. A failed batched run fails each request of the batch (500).

Each batched run reports its rows and how long its first request waited (`observe_rows`,
`observe_wait`, e.g. histograms' `observe`): two calls per batch, nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kdgate.service.tensors import Signature

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
Run = Callable[[Arrays], Arrays]
Observe = Callable[[float], None]


def _ignore(_: float) -> None:
    """The default observer: report nothing."""


def batchable(signature: Signature) -> bool:
    """Whether requests of this signature can be stacked along a leading batch dimension."""
    if len(signature.inputs) != 1:
        return False
    (spec,) = signature.inputs.values()
    fixed_rows = spec.shape[:1] != [-1] or -1 in spec.shape[1:]
    return not fixed_rows and all(out.shape[:1] == [-1] for out in signature.outputs.values())


class Batcher:
    """Batches one session's runs for concurrent requests (see the module doc).

    `run` is looked up on `session` at each run, so a wrapper set later (tests) is honoured.
    `observe_rows(rows)` and `observe_wait(seconds)` are called once per batched run with its
    row count and the wait of its first request (perf_counter seconds). Not thread-safe: use it
    from the event loop.
    """

    def __init__(
        self,
        session: Any,
        max_rows: int,
        *,
        observe_rows: Observe = _ignore,
        observe_wait: Observe = _ignore,
    ) -> None:
        if max_rows < 2:
            raise ValueError("a batch needs max_rows >= 2")
        self.session = session
        self.max_rows = max_rows
        self.observe_rows = observe_rows
        self.observe_wait = observe_wait
        self._pending: list[tuple[Arrays, int, asyncio.Future[Arrays]]] = []
        self._rows = 0
        self._opened = 0.0  # perf_counter() when the first request joined the waiting batch
        # Non-empty while a request has run inline in the current loop iteration. A list rather
        # than a flag so that the loop resets it by calling `list.clear`, a builtin: ~0.4k
        # instructions less than a Python callback (callgrind), per iteration, which at one
        # request per iteration (c1) is per request.
        self._ran_inline: list[bool] = []
        # The last batch had company (more than one request, or one that ran inline in its
        # iteration): requests keep arriving together, so the first of an iteration joins too.
        self._saturated = False
        self._with_inline = False  # a request of the waiting batch's iteration ran inline

    def busy(self) -> bool:
        """Whether a request ready now should join a batch instead of running inline."""
        return bool(self._ran_inline or self._pending or self._saturated)

    def inline(self) -> bool:
        """Whether the request ready now runs inline: True when it is the first of this loop
        iteration, no batch waits and the last batch had no company (the iteration's later
        requests then batch), else False (it joins the batch: `await run(inputs)`). One call
        where there were two (`busy`, then `ran_inline`): this is what a c1 request pays for
        batching."""
        if self._ran_inline or self._pending or self._saturated:
            return False
        self._ran_inline.append(True)
        asyncio.get_running_loop().call_soon(self._ran_inline.clear)
        return True

    async def run(self, inputs: Arrays) -> Arrays:
        """The outputs of `inputs` (validated, rows first), from the next batched run."""
        (rows,) = {len(array) for array in inputs.values()}
        if self._rows + rows > self.max_rows:
            self.flush()
        loop = asyncio.get_running_loop()
        if not self._pending:
            self._opened = time.perf_counter()
            self._with_inline = bool(self._ran_inline)
            loop.call_soon(self.flush)
        future: asyncio.Future[Arrays] = loop.create_future()
        self._pending.append((inputs, rows, future))
        self._rows += rows
        return await future

    def flush(self) -> None:
        """Run every waiting request now, as one batch."""
        pending, self._pending, batch_rows, self._rows = self._pending, [], self._rows, 0
        if not pending:
            return
        self._saturated = len(pending) > 1 or self._with_inline
        try:
            self.observe_rows(batch_rows)
            self.observe_wait(time.perf_counter() - self._opened)
        except Exception:  # bookkeeping must never fail the requests
            log.exception("batch observer failed")
        if len(pending) == 1:
            inputs, _, future = pending[0]
            _settle(future, self.session.run, inputs)
            return
        try:
            (name,) = pending[0][0]
            outputs = self.session.run({name: np.concatenate([p[0][name] for p in pending])})
        except Exception as exc:  # each request answers 500 and the error is logged with it
            for _, _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        total = sum(rows for _, rows, _ in pending)
        if any(len(value) != total for value in outputs.values()):
            log.warning("batched run did not return one row per input row: running alone")
            for inputs, _, future in pending:
                _settle(future, self.session.run, inputs)
            return
        start = 0
        for _, rows, future in pending:
            stop = start + rows
            if not future.done():  # a request whose task was cancelled meanwhile
                future.set_result({key: value[start:stop] for key, value in outputs.items()})
            start = stop


def _settle(future: asyncio.Future[Arrays], run: Run, inputs: Arrays) -> None:
    try:
        outputs = run(inputs)
    except Exception as exc:
        if not future.done():
            future.set_exception(exc)
        return
    if not future.done():
        future.set_result(outputs)
