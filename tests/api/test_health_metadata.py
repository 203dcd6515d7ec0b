"""Health, metadata, V1 listing and readiness: bodies, status codes, identity headers."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import ServerSettings, StudentSettings, load_settings
from kdgate.service.state import load_student
from tests.support.asgi import running

pytestmark = pytest.mark.anyio


async def test_server_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    ready = await client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "kdgate" and "binary_tensor_data" in meta["extensions"]
    assert (await client.get("/")).json() == {"status": "alive"}


@pytest.mark.parametrize("suffix", ["", "/versions/1"])
async def test_model_metadata_and_ready(client: httpx.AsyncClient, suffix: str) -> None:
    meta = await client.get(f"/v2/models/digits{suffix}")
    assert meta.json() == {
        "name": "digits",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert meta.headers["x-kdgate-model-version"] == "1"
    ready = await client.get(f"/v2/models/digits{suffix}/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "digits", "ready": True})


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("/v2/models/cats", "unknown model 'cats'"),
        ("/v2/models/cats/ready", "unknown model 'cats'"),
        ("/v2/models/digits/versions/2", "no version '2'"),
        ("/v2/models/digits/versions/2/ready", "no version '2'"),
        ("/v1/models/cats", "unknown model 'cats'"),
        ("/no/such/path", "Not Found"),
    ],
)
async def test_unknown_things_are_404_with_error_body(
    client: httpx.AsyncClient, url: str, fragment: str
) -> None:
    response = await client.get(url)
    assert response.status_code == 404
    assert fragment in response.json()["error"]
    assert response.headers["x-kdgate-model-version"] == "none"
    assert len(response.headers["x-request-id"]) == 32


async def test_v1_list_and_status(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).json() == {"models": ["digits"]}
    status = await client.get("/v1/models/digits")
    assert (status.status_code, status.json()) == (200, {"name": "digits", "ready": True})


async def test_v1_predict_matches_v2(client: httpx.AsyncClient) -> None:
    x = np.random.default_rng(3).uniform(0, 16, (4, 64))
    v1 = await client.post("/v1/models/digits:predict", json={"instances": x.tolist()})
    v2 = await client.post(
        "/v2/models/digits/infer",
        json={"inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32",
                          "data": x.tolist()}]},
    )  # fmt: skip
    predictions = np.asarray(v1.json()["predictions"])
    assert predictions.shape == (4, 10)
    np.testing.assert_array_equal(predictions.ravel(), v2.json()["outputs"][0]["data"])
    assert v1.headers["x-kdgate-model-version"] == "1"


async def test_client_request_id_header_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/health/live", headers={"x-request-id": "trace-7"})
    assert response.headers["x-request-id"] == "trace-7"


async def test_not_ready_until_the_models_are_warm(config_file: Path) -> None:
    """The lifespan holds readiness until loading ends; requests meanwhile get 503."""
    release = threading.Event()

    def slow_loader(student: StudentSettings, server: ServerSettings) -> StudentSession:
        release.wait(timeout=30)
        return load_student(student, server)

    app = create_app(
        load_settings(config_file), registry=CollectorRegistry(), student_loader=slow_loader
    )
    async with running(app, lifespan=False) as client:
        ready = await client.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        model = await client.get("/v2/models/digits/ready")
        assert (model.status_code, model.json()["ready"]) == (503, False)
        assert (await client.get("/v1/models/digits")).status_code == 503
        infer = await client.post("/v2/models/digits/infer", content=b"{}")
        assert infer.status_code == 503 and "loading" in infer.json()["error"]
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        release.set()
        async with app.router.lifespan_context(app):
            assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        # After shutdown begins, readiness is withdrawn.
        assert (await client.get("/v2/health/ready")).status_code == 503


async def test_a_tampered_model_never_serves(tmp_path: Path) -> None:
    from kdgate.service.cards import ModelFileMismatch
    from tests.support.tiny_model import write_config

    config = write_config(tmp_path)
    onnx_file = tmp_path / "models" / "student-v1.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    app = create_app(load_settings(config), registry=CollectorRegistry())
    with pytest.raises(ModelFileMismatch):
        async with app.router.lifespan_context(app):
            pass


async def test_openapi_documents_every_endpoint(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in [
        "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}",
        "/v2/models/{model}/ready", "/v2/models/{model}/versions/{version}",
        "/v2/models/{model}/versions/{version}/ready", "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer", "/v1/models", "/v1/models/{model}",
        "/v1/models/{model}:predict", "/metrics", "/runbooks", "/runbooks/{name}",
    ]:  # fmt: skip
        assert path in paths, path
    body = paths["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/InferenceRequest"
    assert "InferenceRequest" in schema["components"]["schemas"]
    assert "RequestInput" in schema["components"]["schemas"]
