"""Drift for every model, in process: a table without a reference file, a two-input token model
(reference: its first served rows), an image model (reference: its .npz file), and digits with its
committed file. Drift runs are triggered by the test (`DriftJob.run_once`), so every figure is
checked against scipy on the exact rows sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy.special import rel_entr, softmax
from scipy.stats import wasserstein_distance
from sklearn.datasets import load_digits

from kdgate.monitoring.drift import DriftResult
from kdgate.service.app import create_app
from kdgate.service.settings import Settings, default_models_dir
from tests.support.asgi import running
from tests.support.drift_models import (
    image_batch,
    image_probabilities,
    token_batch,
    token_logits,
    write_student,
)
from tests.support.tiny_model import write_tiny_student

pytestmark = pytest.mark.anyio

REFERENCE_ROWS, WINDOW_ROWS = 300, 600
V2_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def settings(tmp_path: Path, models: list[dict[str, Any]], **drift: Any) -> Settings:
    return Settings.model_validate(
        {
            **({"models": models} if models else {}),  # none: the default digits pair
            "drift": {
                "executor": "thread",
                "every_seconds": 3600,  # the test runs the jobs
                "html_report": False,
                "reference_rows": REFERENCE_ROWS,
                "window_rows": WINDOW_ROWS,
                "min_rows": 100,
                **drift,
            },
            "admin": {"state_dir": str(tmp_path / "state")},
        }
    )


async def send(client: httpx.AsyncClient, model: str, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` to `model` as V2 JSON, 25 rows a request, in order."""
    rows = len(next(iter(arrays.values())))
    for start in range(0, rows, 25):
        inputs = [
            {
                "name": name,
                "shape": list(array[start : start + 25].shape),
                "datatype": V2_DATATYPES[array.dtype],
                "data": array[start : start + 25].ravel().tolist(),
            }
            for name, array in arrays.items()
        ]
        answer = await client.post(f"/v2/models/{model}/infer", json={"inputs": inputs})
        assert answer.status_code == 200, answer.text


async def run_drift(client: httpx.AsyncClient, model: str) -> DriftResult | None:
    app = client._transport.app  # type: ignore[attr-defined]
    app.state.request_log.settle()
    await asyncio.sleep(0)  # settled rows reach the event-loop consumers
    return await asyncio.to_thread(app.state.monitoring.drift_jobs[model].run_once)


async def drift_status(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    answer = await client.get("/v1/slo")
    assert answer.status_code == 200
    (status,) = [d for d in answer.json()["drift"] if d["model"] == model]
    return status


def independent_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of the predicted classes with scipy (Evidently's 1e-4 for an empty class)."""
    cells = np.union1d(reference, current)
    p = np.array([(reference == c).mean() for c in cells])
    q = np.array([(current == c).mean() for c in cells])
    p, q = np.where(p == 0, 1e-4, p), np.where(q == 0, 1e-4, q)
    return float(rel_entr(p, q).sum() + rel_entr(q, p).sum())


def check_against_scipy(result: DriftResult, reference: np.ndarray, current: np.ndarray) -> None:
    """`reference`, `current`: the class scores [rows, classes] as probabilities."""
    ref_class, cur_class = reference.argmax(1), current.argmax(1)
    ref_conf = reference.max(1).astype(np.float32).astype(np.float64)
    cur_conf = current.max(1).astype(np.float32).astype(np.float64)
    assert result.rows == len(current) and result.columns == 2
    assert result.scores["prediction"] == pytest.approx(
        independent_psi(ref_class, cur_class), rel=1e-6, abs=1e-9
    )
    expected = wasserstein_distance(ref_conf, cur_conf) / np.std(ref_conf)
    assert result.scores["confidence"] == pytest.approx(expected, rel=1e-3)


def gauge(client: httpx.AsyncClient, model: str) -> float | None:
    app = client._transport.app  # type: ignore[attr-defined]
    registry: CollectorRegistry = app.state.monitoring.metrics.registry
    return registry.get_sample_value("kdgate_input_drift_share", {"model": model})


# -- a table without a reference file ---------------------------------------------------------


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    card = write_tiny_student(tmp_path / "table")  # no reference.npz beside it
    models = [{"name": "digits", "students": [{"version": "1", "card": str(card)}]}]
    async with running(create_app(settings(tmp_path, models), registry=CollectorRegistry())) as c:
        yield c


async def test_a_table_without_a_reference_file_drifts_against_its_first_requests(
    table: httpx.AsyncClient, tmp_path: Path
) -> None:
    digits = load_digits().data.astype(np.float32)
    rng = np.random.default_rng(0)
    status = await drift_status(table, "digits")
    assert status["status"] == "collecting" and status["features"] == "64 input columns"
    assert status["reference"] == f"first {REFERENCE_ROWS} served rows, collecting 0/300"
    assert (
        (await table.get("/v1/reports/drift"))
        .json()["error"]
        .startswith(
            "no drift report for 'digits' yet: collecting the reference (first 300 served rows, "
        )
    )

    await send(table, "digits", {"input": digits[rng.permutation(len(digits))[:200]]})
    assert await run_drift(table, "digits") is None  # collecting: no run, no figure
    status = await drift_status(table, "digits")
    assert status["reference"] == "first 300 served rows, collecting 200/300"
    assert status["status"] == "collecting" and status["latest"] is None
    assert gauge(table, "digits") is None

    order = rng.permutation(len(digits))
    await send(table, "digits", {"input": digits[order[:100]]})  # completes the reference
    await send(table, "digits", {"input": digits[order[100:700]]})  # the window: clean
    clean = await run_drift(table, "digits")
    assert clean is not None and clean.rows == WINDOW_ROWS and clean.columns == 64
    assert clean.share < 0.25
    status = await drift_status(table, "digits")
    kept = tmp_path / "state" / "drift" / "digits.reference.npz"
    assert status["status"] == "ok"
    assert status["reference"] == f"first 300 served rows (kept in {kept})"
    assert status["reference_rows"] == 300 and status["latest"]["share"] == clean.share

    await send(table, "digits", {"input": 16 - digits[order[700:1300]]})  # inverted digits
    drifted = await run_drift(table, "digits")
    assert drifted is not None and drifted.share > 0.9
    assert gauge(table, "digits") == drifted.share


# -- a token model and an image model ---------------------------------------------------------


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    tokens = write_student(tmp_path / "tokens", "tokens")
    images = write_student(tmp_path / "images", "images")
    # The image model's reference: a sample file with one array per input name.
    reference = image_batch(np.random.default_rng(100), 400)
    np.savez(images.parent / "reference.npz", **reference)
    models = [
        {"name": "tokens", "students": [{"version": "1", "card": str(tokens)}]},
        {"name": "images", "students": [{"version": "1", "card": str(images)}]},
    ]
    app = create_app(settings(tmp_path, models), registry=CollectorRegistry())
    async with running(app) as client:
        yield client


async def test_a_token_model_drifts_on_its_predictions_against_its_first_requests(
    pair: httpx.AsyncClient,
) -> None:
    rng = np.random.default_rng(1)
    status = await drift_status(pair, "tokens")
    assert status["status"] == "collecting" and status["features"] == "prediction, confidence"

    def probabilities(batch: dict[str, np.ndarray]) -> np.ndarray:
        return softmax(token_logits(**batch).astype(np.float64), axis=1)

    first = token_batch(rng, REFERENCE_ROWS)
    await send(pair, "tokens", first)
    assert (await drift_status(pair, "tokens"))["status"] == "waiting"
    clean = token_batch(rng, WINDOW_ROWS)
    await send(pair, "tokens", clean)
    result = await run_drift(pair, "tokens")
    assert result is not None
    check_against_scipy(result, probabilities(first), probabilities(clean))
    assert result.share == 0.0  # the same topic: neither drifted

    shifted = token_batch(rng, WINDOW_ROWS, shifted=True)
    await send(pair, "tokens", shifted)
    result = await run_drift(pair, "tokens")
    assert result is not None
    check_against_scipy(result, probabilities(first), probabilities(shifted))
    assert result.scores["prediction"] > 0.1 and result.scores["confidence"] > 0.1
    assert result.share == 1.0 and gauge(pair, "tokens") == 1.0


async def test_an_image_model_drifts_on_its_predictions_against_its_reference_file(
    pair: httpx.AsyncClient, tmp_path: Path
) -> None:
    rng = np.random.default_rng(2)
    status = await drift_status(pair, "images")
    reference_file = tmp_path / "images" / "reference.npz"
    assert status["reference"] == f"file {reference_file}" and status["reference_rows"] == 400
    assert status["status"] == "waiting"
    with np.load(reference_file) as data:
        reference = image_probabilities(data["image"])

    clean = image_batch(rng, WINDOW_ROWS)
    await send(pair, "images", clean)
    result = await run_drift(pair, "images")
    assert result is not None
    check_against_scipy(result, reference, image_probabilities(clean["image"]))
    assert result.share == 0.0

    brighter = image_batch(rng, WINDOW_ROWS, shifted=True)
    await send(pair, "images", brighter)
    result = await run_drift(pair, "images")
    assert result is not None
    check_against_scipy(result, reference, image_probabilities(brighter["image"]))
    assert result.share == 1.0


async def test_the_projection_adds_input_directions(tmp_path: Path) -> None:
    images = write_student(tmp_path / "images", "images")
    models = [{"name": "images", "students": [{"version": "1", "card": str(images)}]}]
    app = create_app(
        settings(tmp_path, models, projection=8, reference_rows=WINDOW_ROWS),
        registry=CollectorRegistry(),
    )
    rng = np.random.default_rng(3)
    async with running(app) as client:
        status = await drift_status(client, "images")
        assert status["features"] == "prediction, confidence + 8 projected directions of the inputs"
        await send(client, "images", image_batch(rng, WINDOW_ROWS))
        await send(client, "images", image_batch(rng, WINDOW_ROWS))
        clean = await run_drift(client, "images")
        await send(client, "images", image_batch(rng, WINDOW_ROWS, shifted=True))
        drifted = await run_drift(client, "images")
    assert clean is not None and drifted is not None and clean.columns == 10
    # Wasserstein / std over 600 rows is noisy near its 0.1 threshold (a few % of clean
    # columns); the brightened images move every direction far beyond it.
    assert clean.share <= 0.2 and drifted.share == 1.0


# -- the reference file, kept or refused ------------------------------------------------------


async def test_digits_keeps_its_reference_file(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path, [], reference_rows=10), registry=CollectorRegistry())
    async with running(app) as client:
        status = await drift_status(client, "digits")
    reference = default_models_dir() / "digits" / "reference.npz"
    assert status["reference"] == f"file {reference}" and status["reference_rows"] == 359
    assert status["features"] == "64 input columns" and status["status"] == "waiting"


@pytest.mark.parametrize(
    "write",
    [
        lambda path: np.savez(path, pixels=np.zeros((10, 1, 8, 8), np.float32)),  # wrong name
        lambda path: np.savez(path, image=np.zeros((10, 64), np.float32)),  # wrong shape
        lambda path: path.write_bytes(b"not an npz"),
    ],
    ids=["missing-array", "wrong-shape", "not-npz"],
)
async def test_an_unusable_reference_file_falls_back_to_served_rows(
    tmp_path: Path, write: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    images = write_student(tmp_path / "images", "images")
    write(images.parent / "reference.npz")
    models = [{"name": "images", "students": [{"version": "1", "card": str(images)}]}]
    app = create_app(settings(tmp_path, models), registry=CollectorRegistry())
    with caplog.at_level("WARNING", logger="kdgate.service.monitoring_runtime"):
        async with running(app) as client:
            status = await drift_status(client, "images")
    assert status["status"] == "collecting"
    assert status["reference"] == "first 300 served rows, collecting 0/300"
    assert "is not usable" in caplog.text and "first 300 served rows" in caplog.text


async def test_drift_off_says_why(tmp_path: Path) -> None:
    tokens = write_student(tmp_path / "tokens", "tokens")
    models = [{"name": "tokens", "students": [{"version": "1", "card": str(tokens)}]}]
    app = create_app(settings(tmp_path, models, predictions="never"), registry=CollectorRegistry())
    async with running(app) as client:
        status = await drift_status(client, "tokens")
        report = await client.get("/v1/reports/drift")
    assert status == {
        "model": "tokens",
        "status": "off",
        "reason": "drift.predictions is never and drift.projection is 0",
    }
    assert report.status_code == 404 and "drift.predictions is never" in report.json()["error"]


async def test_a_served_reference_is_kept_for_the_next_start(tmp_path: Path) -> None:
    """A restart must not make the traffic of the moment (drifted, maybe) the new reference; a
    new student makes a new one."""
    card = write_tiny_student(tmp_path / "table")
    models = [{"name": "digits", "students": [{"version": "1", "card": str(card)}]}]
    digits = load_digits().data.astype(np.float32)
    kept = tmp_path / "state" / "drift" / "digits.reference.npz"
    app = create_app(settings(tmp_path, models), registry=CollectorRegistry())
    async with running(app) as client:
        await send(client, "digits", {"input": digits[:400]})
        assert await run_drift(client, "digits") is not None  # the first run keeps it
        first = await drift_status(client, "digits")
    assert first["reference"] == f"first 300 served rows (kept in {kept})"
    with np.load(kept) as data:
        np.testing.assert_array_equal(data["rows"], digits[:300])

    app = create_app(settings(tmp_path, models), registry=CollectorRegistry())
    async with running(app) as client:
        again = await drift_status(client, "digits")
        await send(client, "digits", {"input": 16 - digits[:100]})
        result = await run_drift(client, "digits")
    assert again["status"] == "waiting" and again["reference"] == first["reference"]
    assert result is not None and result.rows == 100 and result.share > 0.9

    write_tiny_student(tmp_path / "table", seed=1)  # another student, same paths
    app = create_app(settings(tmp_path, models), registry=CollectorRegistry())
    async with running(app) as client:
        other = await drift_status(client, "digits")
    assert other["reference"] == "first 300 served rows, collecting 0/300"
