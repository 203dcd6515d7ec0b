"""A two-input INT64 text-like pair end to end: real `kdgate serve` processes, every request
shadowed, fidelity read back from /metrics against numpy + scipy on the same weights.

The teacher is local (ONNX in the gateway, calling its inputs `ids`/`mask`, reached through
`input_map`) or remote: a second `kdgate serve` process serving the teacher card as its model,
called over the Open Inference Protocol with both INT64 inputs, and a probabilities output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.support.fidelity_reference import expected, from_metrics, value
from tests.support.live_server import LiveServer, live_server
from tests.support.text_pair import Pair, reference_scores, token_batch, v2_text_body, write_pair

pytestmark = pytest.mark.integration

REQUESTS = 80
ROWS = 2


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def serving(name: str, card: Path, **model: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2},
        "models": [{"name": name, "students": [{"version": "1", "card": str(card)}], **model}],
        "drift": {"enabled": False},
    }


@pytest.fixture(params=["local", "remote"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LiveServer, Pair]]:
    with ExitStack() as stack:
        if request.param == "local":
            pair = write_pair(tmp_path, teacher_names=("ids", "mask"))
            teacher: dict[str, Any] = {
                "card": str(pair.teacher),
                "input_map": {"input_ids": "ids", "attention_mask": "mask"},
            }
        else:
            pair = write_pair(tmp_path, student_kind="probabilities", teacher_kind="probabilities")
            served = stack.enter_context(
                live_server(write_yaml(tmp_path / "teacher.yaml", serving("text-t", pair.teacher)))
            )
            teacher = {"url": served.url, "model": "text-t", "max_batch": 16}
        config = serving("text", pair.student, teacher=teacher, traffic={"shadow_fraction": 1.0})
        yield stack.enter_context(live_server(write_yaml(tmp_path / "gw.yaml", config))), pair


def wait_compared(url: str, rows: int, deadline_seconds: float = 60.0) -> str:
    deadline = time.monotonic() + deadline_seconds
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        done = value(text, "kdgate_shadow_total", model="text") >= rows
        if done or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_every_request_of_a_two_input_pair_is_compared_with_the_teacher(
    gateway: tuple[LiveServer, Pair],
) -> None:
    server, pair = gateway
    rng = np.random.default_rng(21)
    batches = [token_batch(rng, ROWS) for _ in range(REQUESTS)]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i, (ids, mask) in enumerate(batches):
            r = client.post("/v2/models/text/infer", json=v2_text_body(f"q{i}", ids, mask))
            assert r.status_code == 200, r.text
    rows = REQUESTS * ROWS
    text = wait_compared(server.url, rows)
    ids = np.concatenate([b[0] for b in batches])
    mask = np.concatenate([b[1] for b in batches])
    want = expected(
        reference_scores(pair.student_weights, ids, mask),
        reference_scores(pair.teacher_weights, ids, mask),
    )
    got = from_metrics(text, model="text")
    assert value(text, "kdgate_shadow_total", model="text", outcome="compared") == rows
    assert value(text, "kdgate_shadow_total", model="text", outcome="teacher_error") == 0
    assert value(text, "kdgate_comparison_enabled", model="text") == 1
    assert got.samples == rows
    assert got.agreement == pytest.approx(want.agreement, rel=1e-3)
    assert got.mean_kl == pytest.approx(want.mean_kl, rel=1e-3)
    assert got.ece == pytest.approx(want.ece, rel=1e-3)
    assert want.mean_kl > 0.01 and 0 < want.agreement < 1
