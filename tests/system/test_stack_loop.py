"""`make stack STACK_ARGS='--drift invert --loop'` shows the whole loop: the stack's command
(`python -m stack`) on free ports, read until its rollout line says promoted, then stopped with
Ctrl-C (SIGINT) as a user would."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.live_server import REPO

pytestmark = pytest.mark.system


def test_make_stack_with_loop_prints_the_retrain_and_the_rollout_to_promotion(
    tmp_path: Path,
) -> None:
    ports = ["gateway", "teacher", "prometheus", "alertmanager", "receiver", "worker"]
    free = [arg for name in ports for arg in (f"--{name}-port", "0")]
    command = [sys.executable, "-m", "stack", "--drift", "invert", "--loop", "--rate", "40",
               "--workdir", str(tmp_path), *free]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("rollout v2 over v1: promoted" in line for line in seen):
            assert process.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "no promotion within 300 s:\n" + "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert "worker        http://127.0.0.1:" in output
    for expected in (
        "retrain job-000001 model=digits succeeded (rollout), version 2",
        "rollout v2 over v1: running at step 0 (v1 100%, v2 0%)",
        "rollout v2 over v1: running at step 1 (v1 75%, v2 25%)",
        "rollout v2 over v1: promoted at step 2 (v1 0%, v2 100%): every step passed",
        "kdgate stack stopped",
    ):
        assert expected in output, output
    assert "failed" not in output, output  # no job failed, loadgen never failed
