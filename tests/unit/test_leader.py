"""The host's leader lock across real processes: one holder, released when it dies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from kdgate.service.leader import ALWAYS_LEADER, HostLeader

HOLD = """
import sys, time
from kdgate.service.leader import HostLeader
leader = HostLeader(__import__("pathlib").Path(sys.argv[1]))
print(leader.try_acquire(), flush=True)
time.sleep(60)
"""


def test_one_holder_at_a_time_and_a_killed_holder_frees_the_role(tmp_path: Path) -> None:
    lock = tmp_path / "state" / "leader.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        here = HostLeader(lock)
        assert not here.try_acquire() and not here.held
        holder.kill()
        holder.wait()
        started = time.monotonic()
        assert asyncio.run(here.wait(asyncio.Event(), poll_seconds=0.05))
        assert here.held and time.monotonic() - started < 5
        other = HostLeader(lock)
        assert not other.try_acquire()  # this process's own second descriptor is refused too
        here.release()
        assert other.try_acquire()
        other.release()
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_waiting_ends_when_stopped(tmp_path: Path) -> None:
    async def scenario(lock: Path) -> bool:
        first = HostLeader(lock)
        assert first.try_acquire()
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        result = await HostLeader(lock).wait(stop, poll_seconds=0.05)
        first.release()
        return result

    assert asyncio.run(scenario(tmp_path / "leader.lock")) is False


def test_a_single_process_always_leads() -> None:
    assert ALWAYS_LEADER.held and ALWAYS_LEADER.try_acquire()
