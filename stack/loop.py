"""`make stack STACK_ARGS='--loop'`: the stack with `kdgate retrain-worker` answering the gateway.

    overrides, models = loop_overrides(workdir, worker_port)   # for running_stack
    with running_worker(workdir, secrets, gateway_url, worker_port) as worker:
        watch = LoopWatch(gateway_url, worker.url, secrets.admin_token, report=print)

The gateway captures every shadowed row and posts its retrain requests (and rollout events) to
the worker instead of the demo receiver; the worker distils a new digits student from the
capture, registers it and starts the rollout the gateway's config declares (dark -> 25 % ->
100 %, gated on fidelity to the teacher). `LoopWatch.poll` turns the worker's job list and the
gateway's rollout state into one line per change.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from stack.configs import ROOT
from stack.process import KDGATE, Listening, listening, without_kdgate_env
from stack.run import Secrets

MODEL = "digits"
# Steps the demo can watch in a few minutes at 20 requests/s, every request shadowed.
ROLLOUT = {"steps": ["dark", 25, 100], "min_samples": 300, "min_seconds": 20, "max_seconds": 600}


def loop_overrides(workdir: Path, worker_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(gateway overrides, model overrides) for running_stack: capture on, webhook to the
    worker, every request shadowed, the rollout steps."""
    gateway = {
        "webhook": {"url": f"http://127.0.0.1:{worker_port}/webhook", "group_wait_seconds": 10},
        "shadow": {"capture": {"dir": str(workdir / "capture"), "flush_seconds": 2}},
    }
    model = {"traffic": {"shadow_fraction": 1.0}, "rollout": ROLLOUT}
    return gateway, model


def write_worker_config(path: Path, gateway_url: str, port: int) -> Path:
    """The worker's config, without secrets (they come from KDGATE_RETRAIN_* variables)."""
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "gateway": {"url": gateway_url},
        "work_dir": str(path.parent / "retrain"),
        "models": {
            MODEL: {
                "kind": "distill",
                "teacher_card": str(ROOT / "models" / "digits" / "teacher.card.json"),
                "epochs": 150,
                "min_capture_rows": 1000,  # under a minute of the incident's traffic
                "capture_wait_seconds": 300,
                "deadline_seconds": 600,
            }
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_command(config: Path) -> list[str]:
    """`kdgate retrain-worker --config CONFIG` with this interpreter."""
    return [sys.executable, "-m", "kdgate.service.cli", "retrain-worker", "--config", str(config)]


@contextmanager
def running_worker(
    workdir: Path, secrets: Secrets, gateway_url: str, port: int
) -> Iterator[Listening]:
    """`kdgate retrain-worker` on 127.0.0.1:`port` until the block exits."""
    config = write_worker_config(workdir / "retrain-worker.yaml", gateway_url, port)
    env = without_kdgate_env(
        {
            "KDGATE_RETRAIN_SECRET": secrets.webhook_secret,
            "KDGATE_RETRAIN_GATEWAY__TOKEN": secrets.admin_token,
        }
    )
    with listening(worker_command(config), KDGATE, env=env, cwd=ROOT) as worker:
        yield worker


class LoopWatch:
    """Reports each change of the worker's jobs and of the model's rollout, as one line."""

    def __init__(
        self, gateway_url: str, worker_url: str, token: str, report: Callable[[str], None]
    ) -> None:
        self._gateway = gateway_url
        self._worker = worker_url
        self._auth = {"Authorization": f"Bearer {token}"}
        self._report = report
        self._seen: dict[str, str] = {}

    def poll(self) -> None:
        """One look at both; a peer that does not answer is reported once, then retried."""
        lines = [*self._jobs(), *self._rollout()]
        clock = time.strftime("%H:%M:%S")
        for line in lines:
            self._report(f"{clock} {line}")

    def _changed(self, key: str, value: str) -> bool:
        if self._seen.get(key) == value:
            return False
        self._seen[key] = value
        return True

    def _get(self, url: str, headers: dict[str, str] | None = None) -> Any:
        try:
            answer = httpx.get(url, headers=headers, timeout=5)
        except httpx.HTTPError as exc:
            return f"unreachable ({type(exc).__name__})"
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            return f"HTTP {answer.status_code}"
        return answer.json()

    def _jobs(self) -> list[str]:
        body = self._get(f"{self._worker}/jobs")
        if not isinstance(body, dict):
            return [f"worker {body}"] if self._changed("worker", str(body)) else []
        self._seen.pop("worker", None)
        lines = []
        for job in reversed(body.get("jobs", [])):
            state = f"{job['status']} ({job['stage']})" if job.get("stage") else job["status"]
            if job.get("version"):
                state += f", version {job['version']}"
            if job.get("error"):
                state += f": {job['error']}"
            if self._changed(f"job {job['job']}", state):
                lines.append(f"retrain {job['job']} model={job['model']} {state}")
        return lines

    def _rollout(self) -> list[str]:
        url = f"{self._gateway}/admin/models/{MODEL}/rollout"
        body = self._get(url, self._auth)
        if body is None:
            return []
        if not isinstance(body, dict):
            return [f"gateway {body}"] if self._changed("gateway", str(body)) else []
        self._seen.pop("gateway", None)
        weights = ", ".join(f"v{v} {w}%" for v, w in sorted(body.get("weights", {}).items()))
        state = f"{body['state']} at step {body['step']} ({weights})"
        if body.get("reason") and body["state"] not in ("running", "paused"):
            state += f": {body['reason']}"  # why it ended (while running it changes each look)
        if not self._changed(f"rollout {body['candidate']}", state):
            return []
        return [f"rollout v{body['candidate']} over v{body['incumbent']}: {state}"]
