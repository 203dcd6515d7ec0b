"""Kill a process with everything it started, as losing a pod or a host does.

A `kdgate serve` runs a drift child process (and multiprocessing's resource tracker) that
inherit its stdout; killing only the parent leaves them holding the pipe a test reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (what losing a pod does to its processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo.extend(children.get(current, []))
    for member in tree:
        with suppress(ProcessLookupError):  # ended meanwhile
            os.kill(member, signal.SIGKILL)


def stop_tree(process: subprocess.Popen[Any], *, grace_seconds: float = 10.0) -> None:
    """SIGTERM `process`; after `grace_seconds`, SIGKILL it and everything below it.

    A replica whose drift child is mid-run (at the lowest CPU priority, on a busy machine) can
    take longer than a test wants to wait; killing only the parent would orphan the child.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
            return
        except subprocess.TimeoutExpired:
            pass
    kill_tree(process.pid)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
