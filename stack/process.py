"""A child process that listens on 127.0.0.1 and says where in its log: start, find, stop.

    with listening(["prometheus", "--web.listen-address=127.0.0.1:0", ...], PROMETHEUS) as p:
        p.url   # http://127.0.0.1:<the port it got>

Every server in the stack (kdgate, Prometheus, Alertmanager) is started with port 0 where the
test wants no fixed port, and prints the address it bound; reading it back from the log means
there is no pick-a-free-port-then-bind race. Output is pumped into `log` by a thread so that a
full pipe never blocks the child, and so a failure can show what the child said.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What each server logs once it listens; group 1 is the port.
KDGATE = re.compile(r"running on http://127\.0\.0\.1:(\d+)")
PROMETHEUS = re.compile(r'msg="Listening on" address=127\.0\.0\.1:(\d+)')
ALERTMANAGER = PROMETHEUS


@dataclass
class Listening:
    """A started child process and the loopback port it listens on."""

    process: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return "".join(self.log)


def _pump(process: subprocess.Popen[str], log: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        log.append(line)


def _port(log: list[str], pattern: re.Pattern[str]) -> int | None:
    for line in list(log):
        if match := pattern.search(line):
            return int(match.group(1))
    return None


def without_kdgate_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without KDGATE_* settings (they would override a child's
    config file), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")}
    return {**env, **(extra or {})}


def stop(process: subprocess.Popen[Any], *, grace_seconds: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `grace_seconds`; returns once the process is gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def listening(
    command: Sequence[str],
    pattern: re.Pattern[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    deadline_seconds: float = 60.0,
) -> Iterator[Listening]:
    """Run `command` until the block exits; yields once its log names the port it listens on."""
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(os.environ if env is None else env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    pump = threading.Thread(target=_pump, args=(process, log), daemon=True)
    pump.start()
    try:
        deadline = time.monotonic() + deadline_seconds
        while (port := _port(log, pattern)) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start listening:\n" + "".join(log))
            time.sleep(0.05)
        yield Listening(process, port, log)
    finally:
        stop(process)
        pump.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
