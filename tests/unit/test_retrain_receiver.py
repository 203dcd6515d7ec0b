"""The worker's receiver on real uvicorn, requests signed by the official Standard Webhooks
library. The gateway is unreachable here: accepted jobs fail at their first stage, which is
itself checked (reported, counted)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.retrain_config import load_worker_settings
from tests.support.retrain_worker import (
    retrain_body,
    signed,
    wait_finished,
    worker_in_thread,
    write_worker_config,
)

MODELS = {
    "tabular": {"kind": "command", "command": ["true"], "teacher": "teacher.onnx"},
    "digits": {"kind": "distill", "teacher_card": "teacher.card.json"},
}
OTHER_SECRET = "whsec_" + "QUJD" * 8


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[str, CollectorRegistry]]:
    # Port 1 on loopback: nothing listens, every gateway call fails at once.
    config = write_worker_config(tmp_path, gateway_url="http://127.0.0.1:1", models=MODELS)
    registry = CollectorRegistry()
    with worker_in_thread(load_worker_settings(config), registry) as url:
        yield url, registry


def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/webhook", content=body, headers=headers, timeout=10)


def webhooks(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("kdgate_retrain_webhooks_total", {"outcome": outcome}) or 0


@pytest.mark.parametrize("model", ["tabular", "digits"])
def test_a_signed_request_is_accepted_queued_once_and_its_failure_reported(
    worker: tuple[str, CollectorRegistry], model: str
) -> None:
    url, registry = worker
    body = retrain_body(model)
    accepted = post(url, body, signed(body, "msg_1"))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"job": "job-000001", "status": "queued"}
    again = post(url, body, signed(body, "msg_1"))  # a retry of the same delivery
    assert again.status_code == 200 and again.json()["duplicate"] is True

    job = wait_finished(url, "msg_1")
    assert job["status"] == "failed" and job["stage"] == "check"  # the first call to the gateway
    assert "no answer" in job["error"]
    assert httpx.get(f"{url}/jobs", timeout=10).json()["counts"] == {"failed": 1}
    assert webhooks(registry, "accepted") == 1 and webhooks(registry, "duplicate") == 1
    failed = {"model": model, "outcome": "failed"}
    assert registry.get_sample_value("kdgate_retrain_jobs_total", failed) == 1
    assert httpx.get(f"{url}/jobs/1", timeout=10).json()["webhook_id"] == "msg_1"


def test_bad_signatures_and_stale_timestamps_are_401(
    worker: tuple[str, CollectorRegistry],
) -> None:
    url, registry = worker
    body = retrain_body("tabular")
    headers = signed(body, "msg_1")
    refused = [
        post(url, body, signed(body, "msg_1", secret=OTHER_SECRET)),
        post(url, body.replace(b"tabular", b"digits"), headers),  # body changed after signing
        post(url, body, {**headers, "webhook-id": "msg_2"}),  # id changed after signing
        post(url, body, signed(body, "msg_1", at=time.time() - 600)),  # a replay
        post(url, body, signed(body, "msg_1", at=time.time() + 600)),
        post(url, body, {"content-type": "application/json"}),  # unsigned
    ]
    assert [r.status_code for r in refused] == [401] * len(refused)
    assert webhooks(registry, "unauthorized") == len(refused)
    assert httpx.get(f"{url}/jobs", timeout=10).json()["jobs"] == []


def test_bad_bodies_are_400_other_events_ignored(worker: tuple[str, CollectorRegistry]) -> None:
    url, registry = worker
    no_model = {"type": "kdgate.retrain.requested", "data": {"model": ""}}
    for i, body in enumerate(
        [b"{not json", b"[1, 2]", b'{"type": 3}', json.dumps(no_model).encode()]
    ):
        answer = post(url, body, signed(body, f"msg_bad_{i}"))
        assert answer.status_code == 400, body
        assert "error" in answer.json()
    for kind in ("rollout.started", "rollout.promoted"):
        body = json.dumps({"type": kind, "data": {"model": "digits", "candidate": "2"}}).encode()
        answer = post(url, body, signed(body, f"msg_{kind}"))
        assert answer.status_code == 200 and answer.json() == {"ignored": kind}
    assert webhooks(registry, "bad_request") == 4 and webhooks(registry, "ignored") == 2
    assert httpx.get(f"{url}/jobs", timeout=10).json()["jobs"] == []


def test_follow_ups_and_unknown_models_are_recorded_not_run(
    worker: tuple[str, CollectorRegistry],
) -> None:
    url, _ = worker
    follow_up = retrain_body("tabular", follows="msg_0")
    unknown = retrain_body("images")
    for msg_id, body in (("msg_f", follow_up), ("msg_u", unknown)):
        answer = post(url, body, signed(body, msg_id))
        assert answer.status_code == 200 and answer.json()["status"] == "ignored"
    jobs = {j["webhook_id"]: j for j in httpx.get(f"{url}/jobs", timeout=10).json()["jobs"]}
    assert "follow-up of msg_0" in jobs["msg_f"]["error"]
    assert "no retrain is configured for model 'images'" in jobs["msg_u"]["error"]
    assert {j["status"] for j in jobs.values()} == {"ignored"}


def test_a_body_over_the_limit_is_413_and_health_and_metrics_answer(tmp_path: Path) -> None:
    config = write_worker_config(
        tmp_path, gateway_url="http://127.0.0.1:1", models=MODELS, max_body_bytes=1000
    )
    with worker_in_thread(load_worker_settings(config), CollectorRegistry()) as url:
        body = retrain_body("tabular", padding="x" * 2000)
        assert post(url, body, signed(body, "msg_big")).status_code == 413
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'kdgate_retrain_webhooks_total{outcome="too_large"} 1.0' in metrics
        assert httpx.get(f"{url}/jobs/7", timeout=10).status_code == 404
