"""The V2 codec: decode (JSON, nested, binary) and encode (JSON, binary), as pure functions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.cards import TensorSpec
from service.errors import InvalidInput
from service.protocol_v2 import (
    OutputRequest,
    decode_request,
    encode_response,
    parse_header_length,
    parse_json,
)
from service.tensors import Signature

SIG = Signature(
    inputs={
        "a": TensorSpec(name="a", datatype="FP32", shape=[-1, 3]),
        "b": TensorSpec(name="b", datatype="INT64", shape=[2]),
    },
    outputs={
        "y": TensorSpec(name="y", datatype="FP32", shape=[-1, 2]),
        "z": TensorSpec(name="z", datatype="INT64", shape=[-1]),
    },
)
A = {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
B = {"name": "b", "shape": [2], "datatype": "INT64", "data": [7, 8]}


def test_json_request_decodes_to_arrays() -> None:
    request = decode_request(json.dumps({"id": "x", "inputs": [A, B]}).encode(), None, SIG)
    assert request.id == "x"
    np.testing.assert_array_equal(
        request.inputs["a"], np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    )
    assert request.inputs["a"].dtype == np.float32 and request.inputs["b"].dtype == np.int64
    assert request.outputs == (OutputRequest("y", False), OutputRequest("z", False))


def test_missing_input_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"missing input\(s\) \['b'\]"):
        decode_request(json.dumps({"inputs": [A]}).encode(), None, SIG)


def test_float_data_for_int_input_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="expected integers for INT64"):
        decode_request(json.dumps({"inputs": [A, {**B, "data": [1.5, 2]}]}).encode(), None, SIG)


def test_int32_range_is_checked() -> None:
    sig = Signature({"i": TensorSpec(name="i", datatype="INT32", shape=[1])}, SIG.outputs)
    body = {"inputs": [{"name": "i", "shape": [1], "datatype": "INT32", "data": [2**40]}]}
    with pytest.raises(InvalidInput, match="outside the INT32 range"):
        decode_request(json.dumps(body).encode(), None, sig)


def test_binary_inputs_are_cut_in_request_order() -> None:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([9, -9], dtype="<i8")
    header = (
        json.dumps(
            {
                "inputs": [
                    {**B, "data": None, "parameters": {"binary_data_size": 16}},
                    {**A, "data": None, "parameters": {"binary_data_size": 24}},
                ]
            }
        )
        .replace(', "data": null', "")
        .encode()
    )
    body = header + b.tobytes() + a.tobytes()
    request = decode_request(body, parse_header_length(str(len(header)).encode(), len(body)), SIG)
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)


@pytest.mark.parametrize("value", [b"0", b"-3", b"abc", b"100000"])
def test_bad_header_length(value: bytes) -> None:
    with pytest.raises(InvalidInput, match="inference-header-content-length"):
        parse_header_length(value, 1000)


def test_nan_literal_is_reported_as_not_finite_not_as_bad_json() -> None:
    assert np.isnan(parse_json(b"[NaN]")[0])
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_json(b"[nan")


def test_output_selection_and_binary_flags() -> None:
    body = {
        "inputs": [A, B],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "z"}, {"name": "y", "parameters": {"binary_data": False}}],
    }
    request = decode_request(json.dumps(body).encode(), None, SIG)
    assert request.outputs == (OutputRequest("z", True), OutputRequest("y", False))


def test_encode_json_and_binary_round_trip() -> None:
    y = np.array([[0.5, -1.25], [3.0, 4.0]], np.float32)
    z = np.array([1, 2], np.int64)
    body, length = encode_response(
        model_name="m",
        model_version="1",
        request_id="r",
        outputs={"y": y, "z": z},
        requested=(OutputRequest("y", False), OutputRequest("z", True)),
    )
    assert length is not None
    header = json.loads(body[:length])
    assert header["id"] == "r" and header["model_version"] == "1"
    assert header["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 2],
                                    "data": [0.5, -1.25, 3.0, 4.0]}  # fmt: skip
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<i8"), z)


def test_all_json_response_has_no_length() -> None:
    body, length = encode_response(
        model_name="m", model_version="1", request_id="r",
        outputs={"y": np.zeros((1, 2), np.float32)}, requested=(OutputRequest("y", False),),
    )  # fmt: skip
    assert length is None and json.loads(body)["outputs"][0]["data"] == [0.0, 0.0]
