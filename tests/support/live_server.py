"""A real `kdgate serve` process on 127.0.0.1 (port 0), for integration tests.

The server is started through the CLI exactly as a user would, with `--port 0`; the port it got
is read from uvicorn's "running on" log line (stack/process.py), so there is no
pick-then-bind race. KDGATE_* variables of the test run are not passed on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from stack.process import KDGATE, Listening, listening, without_kdgate_env

REPO = Path(__file__).resolve().parents[2]
LiveServer = Listening


@contextmanager
def live_server(config: Path, *, deadline_seconds: float = 60.0) -> Iterator[LiveServer]:
    """Start `python -m kdgate.service.cli serve --config CONFIG --port 0`; yield once ready."""
    command = [
        sys.executable,
        "-m",
        "kdgate.service.cli",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
    ]
    deadline = time.monotonic() + deadline_seconds
    with listening(
        command, KDGATE, env=without_kdgate_env(), cwd=REPO, deadline_seconds=deadline_seconds
    ) as server:
        while httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("kdgate serve never became ready:\n" + server.output())
            time.sleep(0.05)
        yield server
