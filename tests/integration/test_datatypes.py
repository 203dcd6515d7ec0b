"""Every V2 datatype and signature shape through a real kdgate with tritonclient and httpx.

Models built locally with onnx.helper (tests/support/dtype_models.py): Identity per datatype,
two INT64 token inputs, a [N, 3, 8, 8] image, a string input with BYTES and BOOL outputs. The
values that come back must be exactly the ones sent (or what numpy computes from them).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from kdgate.service.datatypes import DATATYPES
from tests.support.dtype_models import sample, write_dtype_config
from tests.support.live_server import LiveServer, live_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    config = write_dtype_config(tmp_path_factory.mktemp("dtypes"))
    with live_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


def tensor(name: str, value: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    entry = triton.InferInput(name, list(value.shape), datatype)
    entry.set_data_from_numpy(value, binary_data=binary)
    return entry


def as_sent(value: np.ndarray, datatype: str, binary: bool) -> np.ndarray:
    """What tritonclient's `as_numpy` returns for `value`: BYTES as str in JSON, bytes binary."""
    if datatype != "BYTES":
        return value
    return np.vectorize(lambda s: s.encode() if binary else s, otypes=[object])(value)


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("rows", [1, 4])
def test_every_datatype_round_trips_exactly(
    client: triton.InferenceServerClient, binary_in: bool, binary_out: bool, rows: int
) -> None:
    values = {dt: sample(dt, rows, seed=rows) for dt in DATATYPES}
    inputs = [tensor(f"in_{dt.lower()}", values[dt], dt, binary_in) for dt in DATATYPES]
    outputs = [
        triton.InferRequestedOutput(f"out_{dt.lower()}", binary_data=binary_out) for dt in DATATYPES
    ]
    result = client.infer("types", inputs, outputs=outputs)
    for dt in DATATYPES:
        got = result.as_numpy(f"out_{dt.lower()}")
        assert got is not None, dt
        assert result.get_output(f"out_{dt.lower()}")["datatype"] == dt
        expected = as_sent(values[dt], dt, binary_out)
        assert got.shape == expected.shape and got.dtype == expected.dtype, dt
        np.testing.assert_array_equal(got, expected, err_msg=dt)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_two_int64_token_inputs(client: triton.InferenceServerClient, binary: bool) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30_000, (3, 7), dtype=np.int64)
    mask = (rng.random((3, 7)) < 0.7).astype(np.int64)
    result = client.infer(
        "text",
        [
            tensor("input_ids", ids, "INT64", binary),
            tensor("attention_mask", mask, "INT64", binary),
        ],
        outputs=[
            triton.InferRequestedOutput("masked", binary_data=binary),
            triton.InferRequestedOutput("lengths", binary_data=binary),
        ],
    )
    np.testing.assert_array_equal(result.as_numpy("masked"), ids * mask)
    np.testing.assert_array_equal(result.as_numpy("lengths"), mask.sum(axis=1))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_image_input(client: triton.InferenceServerClient, binary: bool) -> None:
    pixels = np.random.default_rng(2).uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
    result = client.infer(
        "image",
        [tensor("pixels", pixels, "FP32", binary)],
        outputs=[triton.InferRequestedOutput("means", binary_data=binary)],
    )
    got = result.as_numpy("means")
    assert got is not None and got.shape == (2, 3)
    np.testing.assert_allclose(got, pixels.astype(np.float64).mean(axis=(2, 3)), rtol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_strings_in_bytes_and_bool_out(client: triton.InferenceServerClient, binary: bool) -> None:
    text = np.array(["spam", "ham", "", "spam ", "日本語"], dtype=object)
    result = client.infer(
        "strings",
        [tensor("text", text, "BYTES", binary)],
        outputs=[
            triton.InferRequestedOutput("label", binary_data=binary),
            triton.InferRequestedOutput("is_spam", binary_data=binary),
        ],
    )
    np.testing.assert_array_equal(result.as_numpy("label"), as_sent(text, "BYTES", binary))
    np.testing.assert_array_equal(result.as_numpy("is_spam"), [True, False, False, False, False])


def _next_datatype(datatype: str) -> str:
    return DATATYPES[(DATATYPES.index(datatype) + 1) % len(DATATYPES)]


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_wrong_datatype_is_a_400_naming_the_expected_one(
    client: triton.InferenceServerClient, datatype: str, binary: bool
) -> None:
    wrong = _next_datatype(datatype)
    inputs = [tensor(f"in_{dt.lower()}", sample(dt, 1), dt, binary) for dt in DATATYPES]
    # The tensor of `datatype` declares the next datatype (and carries its values).
    index = DATATYPES.index(datatype)
    inputs[index] = tensor(f"in_{datatype.lower()}", sample(wrong, 1), wrong, binary)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("types", inputs)
    assert caught.value.status() == "400"
    assert f"'in_{datatype.lower()}'" in caught.value.message()
    assert f"model's '{datatype}'" in caught.value.message()


def _types_body(datatype: str, data: list[object]) -> dict[str, object]:
    """A JSON request for the `types` model with `data` for the input of `datatype`."""
    inputs = []
    for dt in DATATYPES:
        values = sample(dt, 1)
        inputs.append(
            {
                "name": f"in_{dt.lower()}",
                "shape": [1, 3],
                "datatype": dt,
                "data": data if dt == datatype else values.ravel().tolist(),
            }
        )
    return {"inputs": inputs}


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT8", [1, 128, 3], "outside the INT8 range ([-128, 127])"),
        ("INT8", [1, -129, 3], "outside the INT8 range"),
        ("UINT8", [0, -1, 3], "outside the UINT8 range ([0, 255])"),
        ("UINT8", [0, 256, 3], "outside the UINT8 range"),
        ("INT16", [0, 32768, 3], "outside the INT16 range"),
        ("INT32", [0, 2**31, 3], "outside the INT32 range"),
        ("INT64", [0, 2**63, 3], "outside the INT64 range"),
        ("INT64", [0, 2**70, 3], "outside the INT64 range"),
        ("INT16", [0, 1.5, 3], "expected integers for INT16"),
        ("BOOL", [True, 1, False], "expected booleans (true/false) for BOOL"),
        ("BOOL", [0, 1, 0], "expected booleans (true/false) for BOOL"),
        ("BOOL", ["true", "false", "true"], "expected booleans (true/false) for BOOL"),
        ("BYTES", ["a", 1, "c"], "expected strings for BYTES"),
        ("BYTES", [1, 2, 3], "expected strings for BYTES"),
        ("BYTES", ["a", None, "c"], "expected strings for BYTES"),
        ("FP16", [0.5, 70000.0, 1], "outside the FP16 range"),
        ("FP16", [0.5, 70000, 1], "outside the FP16 range"),
        ("FP16", [0.5, -65520.0, 1], "outside the FP16 range"),
        ("FP32", [0.5, 1e39, 1], "outside the FP32 range"),
        ("UINT8", [True, False, True], "expected integers for UINT8"),
        ("FP64", ["1.5", 2, 3], "expected numbers for FP64"),
    ],
)
def test_bad_json_values_are_a_400_that_says_why(
    server: LiveServer, datatype: str, data: list[object], message: str
) -> None:
    response = httpx.post(
        f"{server.url}/v2/models/types/infer", json=_types_body(datatype, data), timeout=10
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert f"'in_{datatype.lower()}'" in response.json()["error"]


def test_fp16_values_at_its_maximum_are_accepted(server: LiveServer) -> None:
    body = _types_body("FP16", [65504.0, -65504, 6.1e-05])
    response = httpx.post(f"{server.url}/v2/models/types/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    (out,) = [o for o in response.json()["outputs"] if o["name"] == "out_fp16"]
    # JSON holds the shortest decimal that reads back as the same FP16.
    np.testing.assert_array_equal(
        np.array(out["data"], np.float16), np.array([65504, -65504, 6.1e-05], np.float16)
    )


def _binary_body(name: str, datatype: str, blob: bytes) -> tuple[bytes, int]:
    """A binary request for the `strings` model (one input) carrying `blob`."""
    header = httpx.Request(
        "POST",
        "http://x",
        json={
            "inputs": [
                {
                    "name": name,
                    "shape": [2],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
    ).content
    return header + blob, len(header)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x02\x00\x00\x00ab\x09\x00\x00\x00cd", "declares 9 bytes but only 2 follow"),
        (b"\x02\x00\x00\x00ab", "holds 1 length-prefixed BYTES elements"),
        (b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x00", "and 1 bytes more"),
        (b"\x02\x00\x00\x00\xff\xfe\x00\x00\x00\x00", "BYTES element 0 is not UTF-8"),
    ],
)
def test_malformed_binary_bytes_are_a_400(server: LiveServer, blob: bytes, message: str) -> None:
    body, length = _binary_body("text", "BYTES", blob)
    response = httpx.post(
        f"{server.url}/v2/models/strings/infer",
        content=body,
        headers={"inference-header-content-length": str(length)},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_v1_named_instances_and_columns(server: LiveServer) -> None:
    ids = [[5, 6, 7], [8, 9, 10]]
    mask = [[1, 1, 0], [1, 0, 0]]
    rows = {
        "instances": [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask, strict=True)]
    }
    columns = {"inputs": {"input_ids": ids, "attention_mask": mask}}
    expected = [
        {"masked": [5, 6, 0], "lengths": 2},
        {"masked": [8, 0, 0], "lengths": 1},
    ]
    for body in (rows, columns):
        response = httpx.post(f"{server.url}/v1/models/text:predict", json=body, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": expected}


def test_v1_strings_and_images(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}/v1/models/strings:predict", json={"instances": ["spam", "é"]}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "predictions": [{"label": "spam", "is_spam": True}, {"label": "é", "is_spam": False}]
    }
    pixels = np.random.default_rng(3).uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
    response = httpx.post(
        f"{server.url}/v1/models/image:predict",
        json={"inputs": pixels.tolist()},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        response.json()["predictions"], pixels.astype(np.float64).mean(axis=(2, 3)), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        ("text", {"instances": [{"input_ids": [1, 2]}]}, "missing input(s) ['attention_mask']"),
        ("text", {"instances": [[1, 2]]}, "each instance must be an object"),
        ("text", {"inputs": {"input_ids": [[1]], "attention_mask": [[1.5]]}}, "expected integers"),
        ("strings", {"instances": [1, 2]}, "expected strings for BYTES"),
        ("types", {"instances": [{"in_bool": [1, 0, 1]}]}, "missing input(s)"),
    ],
)
def test_v1_bad_input_is_a_400(
    server: LiveServer, model: str, body: dict[str, object], message: str
) -> None:
    response = httpx.post(f"{server.url}/v1/models/{model}:predict", json=body, timeout=10)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
