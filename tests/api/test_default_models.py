"""The embedded default (no config file) serves the committed models/digits student."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.settings import default_models_dir, load_settings
from tests.support.asgi import running

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_default_student_answers_like_onnxruntime() -> None:
    digits = default_models_dir() / "digits"
    with np.load(digits / "reference.npz", allow_pickle=False) as reference:
        x = reference["inputs"][:32].astype(np.float32)
    expected = ort.InferenceSession(str(digits / "student-v1.onnx")).run(None, {"input": x})[0]
    app = create_app(load_settings(environ={}), registry=CollectorRegistry())
    async with running(app) as client:
        response = await client.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "input", "shape": [32, 64], "datatype": "FP32",
                              "data": x.tolist()}]},
        )  # fmt: skip
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(32, 10)
    np.testing.assert_allclose(got, expected, atol=1e-5)
