"""Drift of a two-input INT64 token model without a reference file, on a real `kdgate serve`: the
first requests become the reference (said in the log and `/v1/slo`), the drift child process
compares the predictions of later ones, and a shifted stream raises `kdgate_input_drift_share`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.support.drift_models import token_batch, write_student
from tests.support.live_server import LiveServer, live_server

pytestmark = pytest.mark.integration

REFERENCE_ROWS = WINDOW_ROWS = 600


def write_config(directory: Path) -> Path:
    card = write_student(directory / "models", "tokens")
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 1},
        "models": [{"name": "tokens", "students": [{"version": "1", "card": str(card)}]}],
        "drift": {
            "every_seconds": 1,
            "reference_rows": REFERENCE_ROWS,
            "window_rows": WINDOW_ROWS,
            "min_rows": 100,
        },
        "admin": {"state_dir": str(directory / "state")},
    }
    path = directory / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def send(server: LiveServer, arrays: dict[str, np.ndarray]) -> None:
    rows = len(arrays["input_ids"])
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for start in range(0, rows, 25):
            inputs = [
                {
                    "name": name,
                    "shape": list(array[start : start + 25].shape),
                    "datatype": "INT64",
                    "data": array[start : start + 25].ravel().tolist(),
                }
                for name, array in arrays.items()
            ]
            answer = client.post("/v2/models/tokens/infer", json={"inputs": inputs})
            assert answer.status_code == 200, answer.text


def drift(server: LiveServer) -> dict[str, Any]:
    (status,) = httpx.get(f"{server.url}/v1/slo", timeout=10).json()["drift"]
    return status


def wait_until(
    server: LiveServer, done: Callable[[dict[str, Any]], bool], seconds: float = 120.0
) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while not done(status := drift(server)):
        assert time.monotonic() < deadline, f"drift never got there: {status}\n{server.output()}"
        time.sleep(0.2)
    return status


def test_a_token_model_without_a_reference_file_gets_drift(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with live_server(write_config(tmp_path)) as server:
        assert (
            "drift for tokens compares prediction, confidence against the reference: "
            "first 600 served rows, collecting 0/600"
        ) in server.output()
        status = drift(server)
        assert status["status"] == "collecting" and status["latest"] is None

        send(server, token_batch(rng, 400))
        assert drift(server)["reference"] == "first 600 served rows, collecting 400/600"
        send(server, token_batch(rng, 200))
        wait_until(server, lambda s: s["reference"].startswith("first 600 served rows ("))
        assert "drift reference of tokens complete: first 600 served rows" in server.output()
        assert "drift reference kept in" in server.output()

        send(server, token_batch(rng, WINDOW_ROWS))
        clean = wait_until(
            server, lambda s: s["latest"] is not None and s["latest"]["rows"] == WINDOW_ROWS
        )["latest"]
        assert clean["scores"]["prediction"] < 0.1 and clean["share"] <= 0.5

        send(server, token_batch(rng, WINDOW_ROWS, shifted=True))
        drifted = wait_until(server, lambda s: s["latest"]["share"] == 1.0)["latest"]
        assert drifted["scores"]["prediction"] > 0.1 and drifted["scores"]["confidence"] > 0.1
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'kdgate_input_drift_share{model="tokens"} 1.0' in metrics
        report = httpx.get(f"{server.url}/v1/reports/drift", timeout=30)
        assert report.status_code == 200 and b"prediction" in report.content
