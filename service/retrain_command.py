"""A child process with a deadline: how the retrain worker runs training.

    await run_command(argv, env=child_env({"KDGATE_OUT": out}), cwd=job_dir,
                      log_path=job_dir / "train.log", deadline_seconds=3600)

No shell: `argv` is run as given. The child starts its own session, so past the deadline (or
when the worker stops) the kill reaches everything it started, not just the first process.
`child_env` leaves out every KDGATE_* variable of the worker's environment: the webhook secret
and the admin token never reach user code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path


class CommandFailed(Exception):
    """The command could not start, exited non-zero or outlived its deadline."""


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without KDGATE_* (secrets, and settings meant for us), plus
    `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")}
    return {**env, **extra}


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    deadline_seconds: float,
) -> None:
    """Run `argv` (no shell) with its output appended to `log_path`; CommandFailed on a
    non-zero exit, a missing program or the deadline (then its whole process group is killed).
    Cancelling the caller kills it too."""
    with log_path.open("ab") as output:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,  # its own group: the kill reaches its children too
            )
        except OSError as exc:
            raise CommandFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(deadline_seconds):
                code = await process.wait()
        except BaseException as exc:  # the deadline, or the worker stopping: no orphan left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            if isinstance(exc, TimeoutError):
                raise CommandFailed(
                    f"still running after {deadline_seconds:g} s (deadline_seconds): killed"
                ) from None
            raise
    if code != 0:
        raise CommandFailed(f"{Path(argv[0]).name} exited with {code}; see {log_path}")
