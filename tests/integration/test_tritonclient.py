"""tritonclient.http against a real kdgate: JSON and binary mode, batch 1 and 32, health calls."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from tests.support.live_server import LiveServer
from tests.support.tiny_model import tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference() -> ort.InferenceSession:
    """onnxruntime on the same model, in the test process: the expected answers."""
    return ort.InferenceSession(tiny_model().SerializeToString())


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_onnxruntime(
    client: triton.InferenceServerClient,
    reference: ort.InferenceSession,
    batch: int,
    binary: bool,
) -> None:
    x = np.random.default_rng(batch).uniform(0, 16, (batch, 64)).astype(np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("digits", [tensor], outputs=[output], request_id=f"t-{batch}")
    got = result.as_numpy("logits")
    assert got is not None and got.shape == (batch, 10)
    np.testing.assert_allclose(got, reference.run(None, {"input": x})[0], atol=1e-5)
    response = result.get_response()
    assert response["id"] == f"t-{batch}"
    assert response["model_version"] == "1"


def test_default_outputs_come_back_binary(
    client: triton.InferenceServerClient, reference: ort.InferenceSession
) -> None:
    """No outputs requested: tritonclient asks for binary_data_output."""
    x = np.ones((2, 64), np.float32)
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer("digits", [tensor], model_version="1")
    np.testing.assert_allclose(
        result.as_numpy("logits"), reference.run(None, {"input": x})[0], atol=1e-5
    )


def test_health_metadata_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("cats")
    server = client.get_server_metadata()
    assert server["name"] == "kdgate" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("digits")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("digits", "1")["versions"] == ["1"]


def test_bad_input_raises_with_our_message(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 63], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 63), np.float32), binary_data=True)
    with pytest.raises(triton.InferenceServerException, match=r"does not match the model's"):
        client.infer("digits", [tensor])
