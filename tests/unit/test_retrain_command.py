"""Training commands: no shell, a deadline that kills, failures that say why, no secrets."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from kdgate.service.retrain_command import CommandFailed, child_env, run_command


def test_a_command_past_its_deadline_is_killed(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    log = tmp_path / "command.log"
    started = time.monotonic()
    with pytest.raises(CommandFailed, match="still running after 1 s"):
        asyncio.run(
            run_command(argv, env=child_env({}), cwd=tmp_path, log_path=log, deadline_seconds=1)
        )
    assert time.monotonic() - started < 15
    assert "started" in log.read_text()


def test_a_missing_program_or_a_failing_one_is_a_job_failure(tmp_path: Path) -> None:
    log = tmp_path / "command.log"

    def run(argv: list[str]) -> None:
        asyncio.run(run_command(argv, env={}, cwd=tmp_path, log_path=log, deadline_seconds=10))

    with pytest.raises(CommandFailed, match="cannot run"):
        run([str(tmp_path / "no-such-program")])
    with pytest.raises(CommandFailed, match="exited with 4"):
        run([sys.executable, "-c", "import sys; sys.exit(4)"])


def test_children_get_no_kdgate_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDGATE_RETRAIN_SECRET", "whsec_x")
    monkeypatch.setenv("KDGATE_RETRAIN_GATEWAY__TOKEN", "t")
    env = child_env({"KDGATE_OUT": "/out"})
    assert {k for k in env if k.startswith("KDGATE_")} == {"KDGATE_OUT"}


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "Z" not in state.split()[1]  # a zombie has been killed, only not reaped yet


def test_the_deadline_kills_what_the_command_started_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "command.log"
    with pytest.raises(CommandFailed, match="killed"):
        asyncio.run(
            run_command(
                [sys.executable, "-c", code],
                env=child_env({}),
                cwd=tmp_path,
                log_path=log,
                deadline_seconds=3,
            )
        )
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the command's own child outlived the deadline"
        time.sleep(0.05)
