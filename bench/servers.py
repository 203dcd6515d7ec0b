"""Start a server under test pinned to one core, wait until it is ready, stop it.

The command is prefixed with `taskset -c CORE`, which execs the server, so the pid we hold is the
server's own and /proc figures are its own.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import numpy as np

from stack.process import stop

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pin(core: int | None) -> list[str]:
    """The `taskset` prefix that pins a command to `core` (nothing when core is None)."""
    return [] if core is None else ["taskset", "-c", str(core)]


def kdgate_command() -> list[str]:
    """How to run the kdgate CLI: the console script if installed, else the module."""
    script = Path(sys.executable).parent / "kdgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kdgate.service.cli"]


def bench_server_command(module: str, onnx: Path, name: str, delay_ms: float = 0.0) -> list[str]:
    """`python -m bench.<module>` serving `onnx` as `name` (port added by `start`)."""
    command = [sys.executable, "-m", f"bench.{module}", "--model", str(onnx), "--name", name]
    return command + (["--delay-ms", str(delay_ms)] if delay_ms else [])


@contextlib.contextmanager
def running(
    command: list[str],
    *,
    port: int,
    core: int | None,
    log: Path,
    ready_timeout_s: float = 60.0,
    cwd: Path = REPO_ROOT,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command --host 127.0.0.1 --port PORT` pinned to `core` until the block exits, in
    `cwd` with `env` (this process's environment when None).

    Yields once `GET /v2/health/ready` answers 200. Stops with SIGTERM (then SIGKILL after 10 s).
    """
    full = [*pin(core), *command, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log, ready_timeout_s)
        yield proc
    finally:
        stop(proc, grace_seconds=10.0)


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll `/v2/health/ready` until 200; raise with the log's tail if the server dies or stalls."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{base_url}/v2/health/ready").status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"server not ready within {timeout_s:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file (empty if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def check_answer(url: str, body: bytes, expected: np.ndarray, atol: float = 1e-5) -> None:
    """POST `body` once and require a 200 whose first output equals `expected` within `atol`.

    A server that answers fast but wrong (or with 4xx) must not be benchmarked.
    """
    response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    if response.status_code != 200:
        raise RuntimeError(f"infer answered {response.status_code}: {response.text[:300]}")
    output = response.json()["outputs"][0]
    got = np.asarray(output["data"], dtype=np.float32).reshape(expected.shape)
    if not np.allclose(got, expected, rtol=0, atol=atol):
        raise RuntimeError(f"infer answered {got.ravel()[:4]}..., expected {expected.ravel()[:4]}")
