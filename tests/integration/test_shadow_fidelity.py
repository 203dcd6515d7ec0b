"""Shadow traffic end to end: real `kdgate serve` processes, the committed digits pair, the digits
test split, and fidelity read back from /metrics against an independent onnxruntime + scipy run.

The teacher is either local (ONNX in the gateway) or remote: a second `kdgate serve` process
serving the teacher card as its only model, called over the Open Inference Protocol.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from kdgate.distill.data import load_split
from tests.support.fidelity_reference import DIGITS, expected, from_metrics, onnx_logits, value
from tests.support.live_server import LiveServer, live_server
from tests.support.slow_teacher import closed_port, stub_teacher
from tests.support.trickling_teacher import TricklingTeacher

pytestmark = pytest.mark.integration


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def gateway_config(tmp: Path, teacher: dict[str, Any], **shadow: Any) -> Path:
    return write_yaml(
        tmp / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2},
            "models": [
                {
                    "name": "digits",
                    "students": [{"version": "1", "card": str(DIGITS / "student-v1.card.json")}],
                    "teacher": teacher,
                    "traffic": {"shadow_fraction": 1.0},
                }
            ],
            "shadow": shadow,
        },
    )


def teacher_config(tmp: Path) -> Path:
    """kdgate serving the teacher card as its model, as deploy/teacher.yaml does."""
    return write_yaml(
        tmp / "teacher.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2},
            "models": [
                {
                    "name": "digits-teacher",
                    "students": [{"version": "1", "card": str(DIGITS / "teacher.card.json")}],
                    "traffic": {"shadow_fraction": 0.0},
                }
            ],
        },
    )


@pytest.fixture(params=["local", "remote"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    with ExitStack() as stack:
        if request.param == "local":
            teacher: dict[str, Any] = {"card": str(DIGITS / "teacher.card.json")}
        else:
            served = stack.enter_context(live_server(teacher_config(tmp_path)))
            teacher = {"url": served.url, "model": "digits-teacher", "max_batch": 16}
        yield stack.enter_context(live_server(gateway_config(tmp_path, teacher)))


def v2_body(request_id: str, rows: np.ndarray) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ],
    }


def wait_for(
    url: str, name: str, target: float, deadline_seconds: float = 60.0, **labels: str
) -> str:
    """Poll /metrics until the sum of `name` (with `labels`) reaches `target`; the exposition."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if value(text, name, **labels) >= target or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_fidelity_counters_match_an_independent_computation(gateway: LiveServer) -> None:
    test = load_split().test
    inputs = test.inputs
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        # One row per V2 request, then the rest as multi-row V1 requests.
        for i in range(300):
            r = client.post("/v2/models/digits/infer", json=v2_body(f"t{i}", inputs[i : i + 1]))
            assert r.status_code == 200, r.text
        for start in range(300, len(inputs), 6):
            r = client.post(
                "/v1/models/digits:predict", json={"instances": inputs[start : start + 6].tolist()}
            )
            assert r.status_code == 200, r.text
    text = wait_for(gateway.url, "kdgate_shadow_total", len(inputs), outcome="compared")

    got = from_metrics(text)
    want = expected(
        onnx_logits(DIGITS / "student-v1.onnx", inputs),
        onnx_logits(DIGITS / "teacher.onnx", inputs),
    )
    assert got.samples == want.samples == len(inputs)
    assert value(text, "kdgate_shadow_total", outcome="dropped") == 0
    assert value(text, "kdgate_shadow_total", outcome="teacher_error") == 0
    assert got.agreement == pytest.approx(want.agreement, rel=1e-3)
    assert got.mean_kl == pytest.approx(want.mean_kl, rel=1e-3)
    assert got.ece == pytest.approx(want.ece, rel=1e-3)
    # The figures are not trivially equal: the student disagrees with the teacher somewhere.
    assert want.mean_kl > 0 and want.ece > 0

    summary = httpx.get(f"{gateway.url}/v1/fidelity", timeout=5).json()["models"]["digits"]
    assert summary["samples"] == len(inputs)
    assert summary["agreement"] == pytest.approx(want.agreement, rel=1e-3)
    assert summary["ece_teacher"] == pytest.approx(want.ece, rel=1e-3)
    assert summary["p95_latency_seconds"] > 0


def send_burst(url: str, rows: np.ndarray, requests: int) -> list[int]:
    with httpx.Client(base_url=url, timeout=10) as client:
        return [
            client.post(
                "/v2/models/digits/infer", json=v2_body(f"b{i}", rows[i % len(rows)][None])
            ).status_code
            for i in range(requests)
        ]


def outcomes(text: str) -> dict[str, float]:
    return {
        o: value(text, "kdgate_shadow_total", outcome=o)
        for o in ("compared", "dropped", "teacher_error")
    }


def test_slow_teacher_never_fails_a_student_request(tmp_path: Path) -> None:
    rows = load_split().test.inputs
    with stub_teacher(delay_seconds=0.2) as teacher:
        config = gateway_config(
            tmp_path,
            {"url": teacher.url, "model": "digits-teacher", "max_batch": 8},
            queue_size=16,
            linger_seconds=0.0,
        )
        with live_server(config) as gateway:
            codes = send_burst(gateway.url, rows, 200)
            text = wait_for(gateway.url, "kdgate_shadow_total", 200)
            seen = outcomes(text)
    assert codes == [200] * 200
    # Every shadowed row is accounted for; the queue (16 rows) overflowed behind a 200 ms
    # teacher, so some rows were dropped rather than slowing the student.
    assert sum(seen.values()) == 200
    assert seen["compared"] > 0 and seen["dropped"] > 0 and seen["teacher_error"] == 0
    assert teacher.calls >= seen["compared"] / 8


def test_teacher_down_never_fails_a_student_request(tmp_path: Path) -> None:
    rows = load_split().test.inputs
    with closed_port() as url:
        config = gateway_config(
            tmp_path,
            {
                "url": url,
                "model": "digits-teacher",
                "breaker": {"failure_threshold": 2, "cooldown_seconds": 60},
            },
            linger_seconds=0.0,
        )
        with live_server(config) as gateway:
            codes = send_burst(gateway.url, rows, 100)
            text = wait_for(gateway.url, "kdgate_shadow_total", 100)
            fidelity = httpx.get(f"{gateway.url}/v1/fidelity", timeout=5).json()
    assert codes == [200] * 100
    seen = outcomes(text)
    assert seen["compared"] == 0 and seen["teacher_error"] + seen["dropped"] == 100
    assert seen["teacher_error"] > 0
    assert fidelity["models"]["digits"]["shadow"]["breaker"] == "open"
    assert fidelity["models"]["digits"]["samples"] == 0


def test_teacher_timing_out_opens_the_breaker(tmp_path: Path) -> None:
    """A teacher slower than the timeout fails its batches; after the threshold it is no longer
    called at all until the cool-down, and the student still answers."""
    rows = load_split().test.inputs
    with stub_teacher(delay_seconds=0.2) as teacher:
        config = gateway_config(
            tmp_path,
            {
                "url": teacher.url,
                "model": "digits-teacher",
                "timeout_seconds": 0.05,
                "max_batch": 1,
                "breaker": {"failure_threshold": 3, "cooldown_seconds": 60},
            },
            linger_seconds=0.0,
        )
        with live_server(config) as gateway:
            codes = send_burst(gateway.url, rows, 50)
            text = wait_for(gateway.url, "kdgate_shadow_total", 50)
            breaker = httpx.get(f"{gateway.url}/v1/fidelity", timeout=5).json()["models"]["digits"][
                "shadow"
            ]["breaker"]
    assert codes == [200] * 50
    seen = outcomes(text)
    assert seen["compared"] == 0 and seen["teacher_error"] + seen["dropped"] == 50
    # The breaker opened after three failed calls: no more than three reached the teacher (a
    # call timed out before its request arrived is not counted by the stub; with the 50 ms
    # total deadline on a busy machine that can be all three).
    assert breaker == "open"
    assert teacher.calls <= 3


def test_sigterm_ends_promptly_while_the_teacher_trickles_forever(tmp_path: Path) -> None:
    rows = load_split().test.inputs
    with TricklingTeacher() as teacher:
        teacher.mode = "body"
        config = gateway_config(
            tmp_path,
            {"url": teacher.url, "model": "digits-teacher", "timeout_seconds": 2},
            linger_seconds=0.0,
            stop_grace_seconds=1,
        )
        with live_server(config) as gateway:
            assert send_burst(gateway.url, rows, 20) == [200] * 20
            deadline = time.monotonic() + 10
            while teacher.requests == 0:  # a teacher call is now stuck in the trickle
                assert time.monotonic() < deadline, "the teacher was never called"
                time.sleep(0.05)
            stopping = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            # Bounded by the grace (1 s) plus one teacher timeout (2 s), not by the trickle.
            assert gateway.process.wait(timeout=15) in (0, -signal.SIGTERM)
            assert time.monotonic() - stopping < 8
