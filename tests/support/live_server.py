"""A real `kdgate serve` process on 127.0.0.1 (port 0), for integration tests.

The server is started through the CLI exactly as a user would, with `--port 0`; the port it got
is read from uvicorn's "running on" log line, so there is no pick-then-bind race.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
_RUNNING = re.compile(r"running on http://127\.0\.0\.1:(\d+)")


@dataclass
class LiveServer:
    process: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _pump(stream: object, log: list[str], found: threading.Event) -> None:
    for line in stream:  # type: ignore[attr-defined]
        log.append(line)
        if _RUNNING.search(line):
            found.set()


@contextmanager
def live_server(config: Path, *, deadline_seconds: float = 60.0) -> Iterator[LiveServer]:
    """Start `python -m service.cli serve --config CONFIG --port 0`; stop it on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    found = threading.Event()
    pump = threading.Thread(target=_pump, args=(process.stdout, log, found), daemon=True)
    pump.start()
    try:
        deadline = time.monotonic() + deadline_seconds
        while not found.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("kdgate serve did not start:\n" + "".join(log))
        port = int(next(m.group(1) for line in log if (m := _RUNNING.search(line))))
        server = LiveServer(process, port, log)
        while httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("kdgate serve never became ready:\n" + "".join(log))
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pump.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
