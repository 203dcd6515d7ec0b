"""service/request_log.py: bulk settling (64 rows / 10 ms), and settle as the read barrier from
any thread: a collect on another thread sees every answered request when it returns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.request_log import ROWS, RequestLog, Served
from kdgate.service.request_metrics import RequestMetrics

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self, *, any_thread: bool) -> None:
        self.any_thread = any_thread
        self.rows: list[str] = []
        self.threads: set[int] = set()

    def consume(self, rows: Sequence[Served]) -> None:
        self.rows.extend(r.request_id for r in rows)
        self.threads.add(threading.get_ident())


class Broken:
    any_thread = True

    def consume(self, rows: Sequence[Served]) -> None:
        raise RuntimeError("boom")


def row(i: int, model: str = "nowhere", seconds: float = 0.001) -> Served:
    return Served("v2", model, None, 404, 0.0, f"r{i}", {}, None, None, seconds)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_settles_at_rows_or_after_its_delay() -> None:
    seen = Recorder(any_thread=False)
    log = RequestLog(consumers=[seen], rows=ROWS, seconds=3600.0)
    for i in range(ROWS - 1):
        log.record(row(i))
    assert seen.rows == [] and len(log) == ROWS - 1
    log.record(row(ROWS - 1))
    assert seen.rows == [f"r{i}" for i in range(ROWS)] and len(log) == 0

    quick = Recorder(any_thread=False)
    log = RequestLog(consumers=[quick], seconds=0.01)
    log.record(row(0))
    for _ in range(1000):  # polled, with a deadline of 5 s
        if quick.rows:
            break
        await asyncio.sleep(0.005)
    assert quick.rows == ["r0"]


async def test_a_collect_on_another_thread_sees_every_answered_request() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(["m"])
    on_loop = Recorder(any_thread=False)
    log = RequestLog(consumers=[Broken(), metrics, on_loop], seconds=3600.0)
    registry.register(metrics.export(before=log.settle))
    for i in range(10):
        log.record(row(i, model="m"))
    labels = {"model": "m", "version": "", "protocol": "v2", "code": "404"}
    got = await asyncio.to_thread(registry.get_sample_value, "kdgate_requests_total", labels)
    assert got == 10  # settled by the collecting thread itself, before it read
    # The loop-only consumer gets the same rows, in order, on the event loop's thread.
    for _ in range(1000):  # polled, with a deadline of 5 s
        if len(on_loop.rows) == 10:
            break
        await asyncio.sleep(0.005)
    for i in range(10, 12):
        log.record(row(i, model="m"))
    log.settle()
    assert on_loop.rows == [f"r{i}" for i in range(12)]
    assert on_loop.threads == {threading.get_ident()}


async def test_concurrent_collects_and_records_lose_nothing() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(["m"])
    log = RequestLog(consumers=[metrics], seconds=3600.0)
    registry.register(metrics.export(before=log.settle))
    labels = {"model": "m", "version": "", "protocol": "v2", "code": "404"}
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            registry.get_sample_value("kdgate_requests_total", labels)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(5000):
            log.record(row(i, model="m"))
            if i % 100 == 0:
                await asyncio.sleep(0)
    finally:
        stop.set()
        scraper.join(10)
    assert registry.get_sample_value("kdgate_requests_total", labels) == 5000


def test_without_an_event_loop_each_request_settles_at_once() -> None:
    seen = Recorder(any_thread=False)
    log = RequestLog(consumers=[seen])
    log.record(row(1))
    assert seen.rows == ["r1"]
