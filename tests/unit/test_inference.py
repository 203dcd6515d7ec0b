"""Request ids and the bounded body reader."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from kdgate.service.errors import PayloadTooLarge, RequestTimeout
from kdgate.service.inference import (
    BodyDeadline,
    ClientDisconnected,
    new_request_id,
    read_body,
    request_ids,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_request_ids_are_uuid4_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in list(ids)[:50]:
        parsed = uuid.UUID(hex=rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == rid


def test_batched_request_ids_are_unique_uuid4_hex_across_batches() -> None:
    ids = request_ids(batch=7)
    taken = [next(ids) for _ in range(7 * 30)]
    assert len(set(taken)) == len(taken)
    for rid in taken[5:9]:  # both sides of a batch boundary
        parsed = uuid.UUID(hex=rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == rid


def receiver(*messages: dict[str, Any]) -> Any:
    queue = list(messages)
    seen: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        message = queue.pop(0)
        seen.append(message)
        return message

    receive.seen = seen  # type: ignore[attr-defined]
    return receive


async def test_chunks_are_joined() -> None:
    receive = receiver(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert await read_body(receive, 10, None, BodyDeadline(5)) == b"abcd"


async def test_declared_length_over_limit_reads_nothing() -> None:
    receive = receiver({"type": "http.request", "body": b"x" * 20})
    with pytest.raises(PayloadTooLarge, match="20 bytes is over the 10-byte limit"):
        await read_body(receive, 10, b"20", BodyDeadline(5))
    assert receive.seen == []


async def test_stream_over_limit_stops_reading() -> None:
    chunk = {"type": "http.request", "body": b"x" * 6, "more_body": True}
    receive = receiver(chunk, chunk, chunk, chunk)
    with pytest.raises(PayloadTooLarge):
        await read_body(receive, 10, None, BodyDeadline(5))
    assert len(receive.seen) == 2


async def test_disconnect() -> None:
    with pytest.raises(ClientDisconnected):
        await read_body(receiver({"type": "http.disconnect"}), 10, None, BodyDeadline(5))


def stalling(*messages: dict[str, Any]) -> Any:
    """A receive() that hands out `messages`, then waits forever (a client that stopped)."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


@pytest.mark.parametrize(
    "sent",
    [(), ({"type": "http.request", "body": b"ab", "more_body": True},)],
    ids=["no-body-yet", "part-of-the-body"],
)
async def test_a_body_that_stops_arriving_is_408_within_the_deadline(
    sent: tuple[dict[str, Any], ...],
) -> None:
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"did not arrive within 0.2 s"):
        await read_body(stalling(*sent), 10, None, BodyDeadline(0.2))
    assert 0.15 < time.monotonic() - started < 2
    # The task carries no pending cancellation: it can go on to send the 408.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)


async def test_a_body_read_in_time_is_not_cut_later() -> None:
    deadline = BodyDeadline(0.05)
    receive = receiver(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"", "more_body": False},
    )
    assert await read_body(receive, 10, None, deadline) == b"ab"
    await asyncio.sleep(0.2)  # a deadline still counting for this task would cancel the sleep


async def test_one_deadline_cuts_only_the_stalled_reads() -> None:
    deadline = BodyDeadline(0.2)
    stalled = [asyncio.create_task(read_body(stalling(), 10, None, deadline)) for _ in range(3)]
    quick = receiver(
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
    )
    for _ in range(20):  # reads that finish keep coming while the stalled ones wait
        assert await read_body(quick, 10, None, deadline) == b"ab"
        quick = receiver(*quick.seen)
        await asyncio.sleep(0.01)
    for reader in stalled:
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(reader, 2)


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    reader = asyncio.create_task(read_body(stalling(), 10, None, BodyDeadline(60)))
    await asyncio.sleep(0.05)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
