"""bench/procstat.py: /proc parsing checked against the kernel's own accounting (os.times,
getrusage) and against hand-written lines."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from bench import procstat


def _self_stat() -> str:
    return Path(f"/proc/{os.getpid()}/stat").read_text()


def test_cpu_ticks_of_this_process_match_os_times() -> None:
    before = os.times()
    ticks = procstat.parse_stat_cpu_ticks(_self_stat())
    after = os.times()
    hz = os.sysconf("SC_CLK_TCK")
    seconds = ticks / hz
    assert before.user + before.system - 2 / hz <= seconds <= after.user + after.system + 2 / hz


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_fields() -> None:
    # Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime ...
    line = "4242 (a) b) (c) S 7 4242 4242 0 -1 4194560 10 0 0 0 123 45 0 0 20 0 1 0 99 0 0"
    assert procstat.parse_stat_cpu_ticks(line) == 168
    assert procstat.parse_stat_ppid(line) == 7


def test_ppid_of_this_process() -> None:
    assert procstat.parse_stat_ppid(_self_stat()) == os.getppid()


def test_peak_rss_matches_getrusage() -> None:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    # Linux reports ru_maxrss in KiB; it is the same high-water mark as VmHWM.
    hwm = procstat.parse_status_kib(status, "VmHWM")
    assert abs(hwm - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) <= 1024
    assert 0 < procstat.parse_status_kib(status, "VmRSS") <= hwm
    assert procstat.parse_status_kib(status, "NoSuchKey") == 0


def test_core_busy_ticks_leave_out_idle_iowait_and_guest() -> None:
    text = (
        "cpu  900 900 900 900 900 900 900 900 900 900\n"
        "cpu0 1 2 3 1000 2000 4 5 6 700 800\n"
        "cpu1 10 20 30 1000 2000 40 50 60 0 0\n"
        "intr 12345\n"
    )
    assert procstat.parse_core_busy_ticks(text, 0) == 1 + 2 + 3 + 4 + 5 + 6
    assert procstat.parse_core_busy_ticks(text, 1) == 10 + 20 + 30 + 40 + 50 + 60
    with pytest.raises(ValueError, match="cpu2"):
        procstat.parse_core_busy_ticks(text, 2)


def test_descendants_include_a_child_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = procstat.descendants(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree
        assert procstat.descendants(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()
