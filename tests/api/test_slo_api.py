"""GET /v1/slo and GET /v1/reports/drift on the default digits pair, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.slo import SLO_NAMES
from kdgate.service.app import create_app
from kdgate.service.settings import Settings, default_models_dir
from tests.support.asgi import running

pytestmark = pytest.mark.anyio


@pytest.fixture
async def digits() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings.model_validate(
        {
            "drift": {
                "executor": "thread",
                "min_rows": 10,
                "every_seconds": 3600,
                "html_report": False,
            }
        }
    )
    app = create_app(settings, registry=CollectorRegistry())
    async with running(app) as client:
        yield client


async def test_slo_status_lists_every_slo_with_its_source(digits: httpx.AsyncClient) -> None:
    answer = await digits.get("/v1/slo")
    assert answer.status_code == 200
    rows = answer.json()["slos"]
    assert [(r["model"], r["slo"]) for r in rows] == [("digits", s) for s in SLO_NAMES]
    for row in rows:
        assert row["status"] == "insufficient_data" and row["samples"] == 0
        assert row["observed"] is None and row["source"] == "default"
        assert row["min_samples"] == 200 and row["window_seconds"] == 300


async def test_drift_report_is_404_until_a_run_and_for_unknown_models(
    digits: httpx.AsyncClient,
) -> None:
    answer = await digits.get("/v1/reports/drift")
    assert answer.status_code == 404 and "no drift report" in answer.json()["error"]
    assert (await digits.get("/v1/reports/drift", params={"model": "cats"})).status_code == 404


async def test_served_inputs_reach_the_drift_buffer(digits: httpx.AsyncClient) -> None:
    with np.load(default_models_dir() / "digits/reference.npz") as data:
        rows = data["inputs"][:3]
    body = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}  # fmt: skip
    assert (await digits.post("/v2/models/digits/infer", json=body)).status_code == 200
    v1 = {"instances": rows[:1].tolist()}
    assert (await digits.post("/v1/models/digits:predict", json=v1)).status_code == 200
    app = digits._transport.app  # type: ignore[attr-defined]
    app.state.request_log.settle()  # now rather than request_log.SECONDS later
    buffered = app.state.monitoring.buffers["digits"].snapshot()
    np.testing.assert_array_equal(buffered, np.concatenate([rows, rows[:1]]))
