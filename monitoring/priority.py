"""CPU priority for monitoring work that shares cores with request handling.

Shadow comparisons and drift runs are batch work: on a core they share with the gateway, the
gateway's requests should win. Linux gives each thread its own nice value, so the local
teacher's thread and the drift child process run at nice 19; the scheduler then hands them
only the CPU that requests leave idle, and the hot path keeps its latency when they are busy.
"""

from __future__ import annotations

import contextlib
import os
import threading

LOWEST = 19


def lowest_process_priority() -> None:
    """Run the calling process at nice 19 (a pool initializer for the drift child process)."""
    os.nice(LOWEST - os.nice(0))


def lowest_thread_priority() -> None:
    """Run the calling thread (only it) at nice 19; a no-op where the OS has no per-thread nice."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST)
