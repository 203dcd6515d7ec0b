"""One leader among the workers of a host: whoever holds an exclusive `flock` on a lock file.

    leader = HostLeader(state_dir / "leader.lock")
    leader.try_acquire()          # True once this process leads (it then leads until it exits)
    await leader.wait(stop)       # poll until this process leads, or `stop` is set

The leader runs what must happen once per host, not once per worker: the drift job, the webhook
sender and the SLO monitor's retrain requests (service/monitoring_runtime.py). The kernel drops
a `flock` when its holder's descriptor closes, which includes a crash or SIGKILL, so a dead
leader never holds the role and no lease or heartbeat is needed; the other workers poll and one
takes over within `poll_seconds`.

`ALWAYS_LEADER` is the single-process case: `kdgate serve` without `--workers` leads itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how soon a worker notices that the leader died


class HostLeader:
    """The leader lock of one host (`path`: a file in the state directory, created if missing)."""

    def __init__(
        self,
        path: Path,
        *,
        name: str = "this worker",
        duties: str = "drift job, webhook sender, retrain requests",
    ) -> None:
        self.path = path
        self.name = name  # for the log line
        self.duties = duties
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process leads."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (never blocks); True while this process leads."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        log.info("%s (pid %d) leads this host: %s", self.name, os.getpid(), self.duties)
        return True

    async def wait(self, stop: asyncio.Event, poll_seconds: float = POLL_SECONDS) -> bool:
        """Poll until this process leads (True) or `stop` is set (False)."""
        while not self.try_acquire():
            try:
                await asyncio.wait_for(stop.wait(), poll_seconds)
                return False
            except TimeoutError:
                continue
        return True

    def release(self) -> None:
        """Give the role up (at shutdown; a crash gives it up too)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


class _AlwaysLeader(HostLeader):
    """One process on its own: it leads from the start, with no lock file."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull))

    @property
    def held(self) -> bool:
        return True

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


ALWAYS_LEADER: HostLeader = _AlwaysLeader()
