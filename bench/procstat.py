"""What a server process costs, read from /proc: CPU seconds, resident memory, core noise.

CPU per request (utime + stime delta over a measured interval, divided by the requests served)
is steadier than throughput on a shared machine: a neighbour stealing the core lowers req/s but
not the CPU each request costs. How busy the server's and the load generator's cores were
in total tells the share other processes took from them (noise), reported beside each figure.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def parse_stat_cpu_ticks(stat_line: str) -> int:
    """utime + stime (clock ticks) from one /proc/<pid>/stat line.

    The command name (field 2) is in parentheses and may contain spaces and ')', so fields are
    counted after the last ')': utime and stime are fields 14 and 15 of the whole line.
    """
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    return int(fields[14 - 3]) + int(fields[15 - 3])


def parse_stat_ppid(stat_line: str) -> int:
    """The parent pid (field 4) from one /proc/<pid>/stat line."""
    return int(stat_line[stat_line.rindex(")") + 2 :].split()[4 - 3])


def parse_status_kib(status_text: str, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (e.g. VmRSS, VmHWM), in KiB; 0 when absent."""
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return 0


def parse_core_busy_ticks(proc_stat_text: str, core: int) -> int:
    """Busy ticks of one core from /proc/stat: every column except idle and iowait.

    guest and guest_nice are already counted in user and nice, so they are left out.
    """
    label = f"cpu{core}"
    for line in proc_stat_text.splitlines():
        parts = line.split()
        if parts and parts[0] == label:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, parts[1:9])
            return user + nice + system + irq + softirq + steal
    raise ValueError(f"no {label} line in /proc/stat")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a server may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = parse_stat_ppid((entry / "stat").read_text())
        except (OSError, ValueError):
            continue  # the process exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """A point-in-time reading of CPU seconds used so far.

    `children_cpu_s` is this process's waited-for children (the load generator, once it has
    exited); `cores_busy_s` the busy seconds of each requested core (None where not pinned).
    """

    process_cpu_s: float
    children_cpu_s: float
    cores_busy_s: tuple[float | None, ...]


def sample(pid: int, cores: tuple[int | None, ...]) -> Sample:
    """Read the CPU used so far by `pid` (with its descendants), our children, and `cores`."""
    ticks = 0
    for member in descendants(pid):
        try:
            ticks += parse_stat_cpu_ticks((PROC / str(member) / "stat").read_text())
        except (OSError, ValueError):
            continue
    proc_stat = (PROC / "stat").read_text()
    hz = _ticks_per_second()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Sample(
        process_cpu_s=ticks / hz,
        children_cpu_s=children.ru_utime + children.ru_stime,
        cores_busy_s=tuple(
            None if core is None else parse_core_busy_ticks(proc_stat, core) / hz for core in cores
        ),
    )


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over `pid` and its descendants."""
    rss = hwm = 0
    for member in descendants(pid):
        try:
            status = (PROC / str(member) / "status").read_text()
        except OSError:
            continue
        rss += parse_status_kib(status, "VmRSS")
        hwm += parse_status_kib(status, "VmHWM")
    return rss, hwm
