"""The app's registry: process/Python collectors, build info, micro-batch and breaker metrics."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from kdgate.service.app import create_app
from kdgate.service.settings import Settings
from tests.support.asgi import running
from tests.support.fidelity_reference import DIGITS

pytestmark = pytest.mark.anyio


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def digits(**model: Any) -> Settings:
    student = {"version": "1", "card": DIGITS / "student-v1.card.json"}
    return Settings.model_validate(
        {
            "server": {"warmup_runs": 1},
            "models": [{"name": "digits", "students": [student], **model}],
        }
    )


def infer_body(row: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]
    }


async def test_the_app_registry_carries_process_python_and_build_metrics() -> None:
    registry = CollectorRegistry()
    async with running(create_app(digits(), registry=registry)) as client:
        text = (await client.get("/metrics")).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert {
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    } <= names
    assert {"python_info", "python_gc_collections_total", "kdgate_build_info"} <= names
    assert registry.get_sample_value("process_resident_memory_bytes") > 0


async def test_breaker_state_gauge_follows_the_teacher_breaker() -> None:
    registry = CollectorRegistry()
    teacher = {
        "url": f"http://127.0.0.1:{closed_port()}",
        "model": "digits-teacher",
        "breaker": {"failure_threshold": 1, "cooldown_seconds": 600},
    }
    app = create_app(digits(teacher=teacher, traffic={"shadow_fraction": 1.0}), registry=registry)
    rows = load_digits().data[:3].astype(np.float32)
    state = {"model": "digits"}
    async with running(app) as client:
        assert registry.get_sample_value("kdgate_teacher_breaker_state", state) == 0  # closed
        for row in rows:
            r = await client.post("/v2/models/digits/infer", json=infer_body(row))
            assert r.status_code == 200  # the student answers whatever the teacher does
        for _ in range(500):
            if registry.get_sample_value("kdgate_teacher_breaker_state", state) == 2:
                break
            await asyncio.sleep(0.02)
        assert registry.get_sample_value("kdgate_teacher_breaker_state", state) == 2  # open
        fidelity = (await client.get("/v1/fidelity")).json()
    assert fidelity["models"]["digits"]["shadow"]["breaker"] == "open"


async def test_concurrent_requests_report_their_batches() -> None:
    registry = CollectorRegistry()
    app = create_app(digits(), registry=registry)  # server.batch_max_rows: 32
    rows = load_digits().data[:40].astype(np.float32)
    labels = {"model": "digits", "version": "1"}
    async with running(app) as client:
        answers = await asyncio.gather(
            *(client.post("/v2/models/digits/infer", json=infer_body(row)) for row in rows)
        )
        assert all(a.status_code == 200 for a in answers)
        batches = registry.get_sample_value("kdgate_batch_rows_count", labels)
        batched_rows = registry.get_sample_value("kdgate_batch_rows_sum", labels)
        waits = registry.get_sample_value("kdgate_batch_wait_seconds_count", labels)
    assert batches is not None and batched_rows is not None
    # Every request either ran inline or joined a batch; a batch has at least one row.
    assert 1 <= batches <= batched_rows <= len(rows)
    assert waits == batches  # one wait per batch, never one per request
