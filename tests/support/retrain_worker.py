"""The retrain worker in tests: its config, requests signed by the official Standard Webhooks
library, and the worker run as `kdgate retrain-worker` (a real process) or in a thread (real
uvicorn, an injected registry).

    config = write_worker_config(tmp_path, gateway_url=server.url, models={...})
    with live_worker(config) as worker:
        post_retrain(worker.url, "tabular", msg_id="msg_1")
        job = wait_finished(worker.url, "msg_1")
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook

from kdgate.monitoring.webhook import retrain_payload
from kdgate.service.retrain_app import create_worker_app
from kdgate.service.retrain_config import RetrainWorkerSettings
from stack.loop import worker_command
from stack.process import KDGATE, Listening, listening, without_kdgate_env
from tests.support.traffic import TOKEN

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test credential, 24 bytes


def write_worker_config(
    directory: Path, *, gateway_url: str, models: dict[str, Any], **more: Any
) -> Path:
    """A worker config in `directory` (work dir `directory/work`); secrets in the file."""
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "secret": SECRET,
        "gateway": {"url": gateway_url, "token": TOKEN, "timeout_seconds": 60},
        "work_dir": "work",
        "poll_seconds": 0.2,
        "models": models,
        **more,
    }
    path = directory / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def signed(
    body: bytes, msg_id: str, *, secret: str = SECRET, at: float | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for `body`, signed by the official library."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    signature = Webhook(secret).sign(msg_id, moment, body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
    }


def retrain_body(model: str, capture_dir: Path | None = None, **data: Any) -> bytes:
    """A retrain request as the gateway sends it (`monitoring.webhook.retrain_payload`)."""
    capture = None if capture_dir is None else {"dir": str(capture_dir), "rows": 0, "format": "npz"}
    payload = retrain_payload(
        model,
        [{"slo": "agreement", "observed": 0.5, "objective": 0.9}],
        student_version="1",
        teacher_version="1",
        capture=capture,
    )
    payload["data"].update(data)
    return json.dumps(payload).encode()


def post_retrain(url: str, body: bytes, msg_id: str) -> httpx.Response:
    return httpx.post(f"{url}/webhook", content=body, headers=signed(body, msg_id), timeout=10)


def job_of(url: str, msg_id: str) -> dict[str, Any] | None:
    jobs = httpx.get(f"{url}/jobs", timeout=10).json()["jobs"]
    return next((j for j in jobs if j["webhook_id"] == msg_id), None)


def wait_finished(url: str, msg_id: str, *, deadline_seconds: float = 90) -> dict[str, Any]:
    """The job of `msg_id` once it has finished (polled; AssertionError past the deadline)."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        job = job_of(url, msg_id)
        if job is not None and job["status"] in ("succeeded", "failed", "ignored"):
            return job
        assert time.monotonic() < deadline, f"job of {msg_id} not finished: {job}"
        time.sleep(0.1)


@contextmanager
def live_worker(
    config: Path, *, env: dict[str, str] | None = None, deadline_seconds: float = 30
) -> Iterator[Listening]:
    """`python -m kdgate.service.cli retrain-worker --config CONFIG`, once it listens; `env`:
    variables on top of this environment without its KDGATE_* ones."""
    with listening(
        worker_command(config),
        KDGATE,
        env=without_kdgate_env(env),
        cwd=REPO,
        deadline_seconds=deadline_seconds,
    ) as worker:
        yield worker


@contextmanager
def worker_in_thread(
    settings: RetrainWorkerSettings, registry: CollectorRegistry, *, deadline_seconds: float = 10
) -> Iterator[str]:
    """The worker app on real uvicorn (127.0.0.1, a free port) in a thread; yields its URL."""
    app = create_worker_app(settings, registry=registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + deadline_seconds
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=deadline_seconds)
