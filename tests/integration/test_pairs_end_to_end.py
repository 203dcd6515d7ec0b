"""Bring your own pair, end to end, on each of the four pair families.

`kdgate import` (the real CLI) -> `kdgate serve` on the config it printed (every request
shadowed) -> the sample sent in V2 JSON (httpx) and binary tensors (tritonclient) -> /metrics
polled until every row is compared -> exported agreement, KL and ECE equal an independent
onnxruntime + scipy computation; labels sent to the feedback API reach the label calibration;
a shifted input stream raises the drift share.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import yaml
from scipy.special import softmax
from scipy.stats import entropy

from kdgate.service.cards import ModelCard, load_card
from stack.process import without_kdgate_env
from tests.support.fidelity_reference import brute_force_ece, from_metrics, value
from tests.support.live_server import REPO, LiveServer, live_server
from tests.support.pairs import Pair, PairCache

pytestmark = pytest.mark.integration

FAMILIES = ["digits", "tabular", "text", "images"]
ROWS_PER_REQUEST = 8
SHIFTED_ROWS = 200  # the drift window: all of it shifted once they are sent


def kdgate_import(pair: Pair, out: Path) -> str:
    """Run `kdgate import` on a pair; the config it printed."""
    done = subprocess.run(
        [
            sys.executable, "-m", "kdgate.service.cli", "import",
            "--teacher", str(pair.teacher), "--student", str(pair.student),
            "--name", pair.family, "--sample", str(pair.sample), "--out", str(out),
        ],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=without_kdgate_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def served_config(printed: str, out: Path) -> Path:
    """The printed config, with what a test run needs: any port, every request shadowed, drift
    runs every second over the last `SHIFTED_ROWS` inputs."""
    config: dict[str, Any] = yaml.safe_load(printed)
    config["server"] = {"host": "127.0.0.1", "port": 0, "warmup_runs": 2}
    config["models"][0]["traffic"] = {"shadow_fraction": 1.0}
    config["drift"] = {
        "every_seconds": 1.0,
        "min_rows": 50,
        "window_rows": SHIFTED_ROWS,
        "executor": "thread",
        "html_report": False,
    }
    config["admin"] = {"state_dir": str(out / "state")}
    path = out / "serve.yaml"  # beside the cards: their paths are relative to it
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(params=FAMILIES)
def imported(
    request: pytest.FixtureRequest, pairs: PairCache, tmp_path: Path
) -> Iterator[tuple[Pair, ModelCard, LiveServer]]:
    pair = pairs.get(request.param)
    printed = kdgate_import(pair, tmp_path)
    card = load_card(tmp_path / "student.card.json")
    with live_server(served_config(printed, tmp_path)) as server:
        yield pair, card, server


def onnx_scores(model: Path, output: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (out,) = session.run([output], inputs)
    return np.asarray(out, dtype=np.float64)


def as_probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    return scores if kind == "probabilities" else softmax(scores, axis=1)


def load_sample(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, arrays.pop("labels")


def send(
    server: LiveServer, card: ModelCard, inputs: dict[str, np.ndarray], prefix: str
) -> dict[str, np.ndarray]:
    """Send every row, `ROWS_PER_REQUEST` a request, alternately V2 JSON (httpx) and binary
    tensors (tritonclient); the scores output of each request, by request id."""
    name, scores = card.name, card.scores_output
    assert scores is not None
    datatypes = {t.name: t.datatype for t in card.inputs}
    rows = len(next(iter(inputs.values())))
    answers: dict[str, np.ndarray] = {}
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for n, start in enumerate(range(0, rows, ROWS_PER_REQUEST)):
                request_id = f"{prefix}-{n}"
                batch = {k: v[start : start + ROWS_PER_REQUEST] for k, v in inputs.items()}
                if n % 2 == 0:
                    body = {
                        "id": request_id,
                        "inputs": [
                            {
                                "name": k,
                                "shape": list(v.shape),
                                "datatype": datatypes[k],
                                "data": v.ravel().tolist(),
                            }
                            for k, v in batch.items()
                        ],
                        "outputs": [{"name": scores}],
                    }
                    r = http.post(f"/v2/models/{name}/infer", json=body)
                    assert r.status_code == 200, r.text
                    (out,) = r.json()["outputs"]
                    answers[request_id] = np.asarray(out["data"]).reshape(out["shape"])
                else:
                    tensors = []
                    for k, v in batch.items():
                        tensor = triton.InferInput(k, list(v.shape), datatypes[k])
                        tensor.set_data_from_numpy(v, binary_data=True)
                        tensors.append(tensor)
                    wanted = [triton.InferRequestedOutput(scores, binary_data=True)]
                    result = client.infer(name, tensors, outputs=wanted, request_id=request_id)
                    got = result.as_numpy(scores)
                    assert got is not None
                    answers[request_id] = got
    finally:
        client.close()
    return answers


def wait_for(server: LiveServer, name: str, target: float, **labels: str) -> str:
    """Poll /metrics until the sum of `name` with `labels` reaches `target` (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        if value(text, name, **labels) >= target or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def label_ece(text: str, model: str, version: str) -> float:
    """ECE against labels of one version's series, as the PromQL in docs/metrics.md."""
    labels = {"model": model, "reference": "label", "version": version}
    gap = sum(
        abs(
            value(text, "kdgate_calibration_correct_total", bin=str(b), **labels)
            - value(text, "kdgate_calibration_confidence_total", bin=str(b), **labels)
        )
        for b in range(15)
    )
    return gap / value(text, "kdgate_calibration_samples_total", **labels)


def test_an_imported_pair_is_served_shadowed_and_watched(
    imported: tuple[Pair, ModelCard, LiveServer],
) -> None:
    pair, card, server = imported
    family, scores = pair.family, pair.scores
    inputs, labels = load_sample(pair.sample)
    rows = len(labels)

    answers = send(server, card, inputs, "clean")
    student = onnx_scores(pair.student, scores, inputs)
    teacher = onnx_scores(pair.teacher, scores, inputs)
    served = np.concatenate([answers[f"clean-{n}"] for n in range(len(answers))])
    np.testing.assert_allclose(served, student, rtol=1e-5, atol=1e-5)

    text = wait_for(server, "kdgate_shadow_total", rows, model=family, outcome="compared")
    outcomes = {
        outcome: value(text, "kdgate_shadow_total", model=family, outcome=outcome)
        for outcome in ("compared", "dropped", "teacher_error")
    }
    assert outcomes == {"compared": rows, "dropped": 0, "teacher_error": 0}, server.output()
    got = from_metrics(text, model=family)
    p = as_probabilities(student, card.output_kind)
    q = as_probabilities(teacher, card.output_kind)
    assert got.samples == rows
    assert got.agreement == pytest.approx(np.mean(p.argmax(1) == q.argmax(1)), rel=1e-3)
    assert got.mean_kl == pytest.approx(np.mean(entropy(q, p, axis=1)), rel=1e-3)
    assert got.ece == pytest.approx(brute_force_ece(p, q.argmax(1)), rel=1e-3)
    # The card's figures, measured by `kdgate import`, are the served ones.
    assert card.metrics.kl_mean_nats == pytest.approx(got.mean_kl, rel=1e-3)

    feedback = [
        {"id": f"clean-{n}", "label": labels[start : start + ROWS_PER_REQUEST].tolist()}
        for n, start in enumerate(range(0, rows, ROWS_PER_REQUEST))
    ]
    r = httpx.post(f"{server.url}/v2/models/{family}/feedback", json=feedback, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == len(feedback), r.text
    text = wait_for(
        server, "kdgate_calibration_samples_total", rows, model=family, reference="label",
        version="1",
    )  # fmt: skip
    assert label_ece(text, family, "1") == pytest.approx(brute_force_ece(p, labels), rel=1e-3)
    assert label_ece(text, family, "teacher") == pytest.approx(brute_force_ece(q, labels), rel=1e-3)

    shifted, _ = load_sample(pair.shifted)
    send(server, card, {k: v[:SHIFTED_ROWS] for k, v in shifted.items()}, "shifted")
    text = wait_for(server, "kdgate_input_drift_share", 0.3, model=family)
    assert value(text, "kdgate_input_drift_share", model=family) >= 0.3
