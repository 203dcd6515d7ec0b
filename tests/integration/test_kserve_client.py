"""KServe's client view of our answers, against a real kdgate.

The `kserve` package cannot be installed next to our pins (pandas<3, protobuf<7, kubernetes,
grpcio), so this test replays exactly the HTTP calls `kserve.InferenceRESTClient` 0.21 makes for
its health calls, applies its parsing rules, and validates every body with KServe's own pydantic
models (vendored in tests/support/kserve_v2_datamodels.py).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support import kserve_v2_datamodels as kserve
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.integration


def test_v2_health_calls(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        live = http.get("/v2/health/live")
        assert live.is_success and live.json().get("live") is True  # is_server_live (v2)
        kserve.ServerLiveResponse.model_validate_json(live.content)
        ready = http.get("/v2/health/ready")
        assert ready.is_success and ready.json().get("ready") is True  # is_server_ready
        kserve.ServerReadyResponse.model_validate_json(ready.content)
        assert http.get("/v2/models/digits/ready").is_success  # is_model_ready (v2)
        kserve.ModelReadyResponse.model_validate_json(http.get("/v2/models/digits/ready").content)
        assert not http.get("/v2/models/cats/ready").is_success


def test_v1_health_calls(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        root = http.get("/")  # is_server_live (v1): GET base_url, {"status": "alive"}
        assert root.is_success and root.json().get("status").lower() == "alive"
        model = http.get("/v1/models/digits")  # is_model_ready (v1)
        assert model.is_success and model.json().get("ready") is True


def test_metadata_and_infer_parse_as_kserve_types(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        kserve.ServerMetadataResponse.model_validate_json(http.get("/v2").content)
        meta = kserve.ModelMetadataResponse.model_validate_json(
            http.get("/v2/models/digits").content
        )
        assert meta.inputs[0].shape == [-1, 64]
        kserve.ListModelsResponse.model_validate_json(http.get("/v1/models").content)
        request = kserve.InferenceRequest(
            id="k1",
            inputs=[
                kserve.RequestInput(name="input", shape=[1, 64], datatype="FP32", data=[1.0] * 64)
            ],
        )
        response = http.post(
            "/v2/models/digits/infer",
            content=request.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json"},
        )
        parsed = kserve.InferenceResponse.model_validate_json(response.content)
        assert parsed.id == "k1" and parsed.model_name == "digits"
        assert np.asarray(parsed.outputs[0].data).shape == (10,)
