"""The V2 codec: decode (JSON, nested, binary) and encode (JSON, binary), as pure functions."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import serialize_byte_tensor

from kdgate.service.cards import TensorSpec
from kdgate.service.datatypes import DATATYPES, NUMPY_DTYPES
from kdgate.service.errors import InvalidInput
from kdgate.service.protocol_v2 import (
    OutputRequest,
    V2Request,
    _decode_common,
    _decode_general,
    bytes_blob,
    decode_request,
    encode_response,
    parse_header_length,
    parse_json,
)
from kdgate.service.tensors import Signature
from tests.support.dtype_models import sample

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


# The usual request's shortcut (`_decode_common`) must answer exactly what the general path
# answers: the same arrays, or the same error message. Requests are drawn around the usual one,
# with every field sometimes wrong.
ONE = Signature(
    inputs={"x": TensorSpec(name="x", datatype="FP32", shape=[-1, 2])}, outputs=SIG.outputs
)
_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**64 - 1),  # orjson's ints: larger ones parse as floats
    st.sampled_from([1e39, -3.4e38, True, None, "1.5"]),
)
_tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y"]),
        "datatype": st.sampled_from(["FP32", "FP64", "INT64"]),
        "shape": st.one_of(
            st.lists(st.integers(-1, 3), min_size=1, max_size=3), st.just("2"), st.just([1.0, 2])
        ),
        "data": st.one_of(
            st.lists(_values, max_size=6),
            st.lists(st.lists(st.floats(-10, 10), min_size=2, max_size=2), max_size=3),
            st.just("nope"),
        ),
    },
    optional={"parameters": st.just({})},
)
_requests = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(_tensors, min_size=1, max_size=2), st.just([]))},
    optional={"id": st.sampled_from(["r1", "", 7]), "outputs": st.just([{"name": "y"}])},
)


def _outcome(decode: Callable[[], V2Request | None]) -> object:
    """What a decoder answered, comparably: the error message, or the decoded request."""
    try:
        request = decode()
    except InvalidInput as exc:
        return exc.message
    if request is None:
        return None
    arrays = {
        name: (array.dtype, array.shape, array.tolist()) for name, array in request.inputs.items()
    }
    return request.id, arrays, request.outputs


@settings(max_examples=1000, deadline=None)
@given(_requests)
def test_usual_request_shortcut_answers_as_the_general_path(request: dict[str, object]) -> None:
    general = _outcome(lambda: _decode_general(request, memoryview(b""), None, ONE))
    common = _outcome(lambda: _decode_common(request, ONE))
    assert common is None or common == general  # None: not a usual request, no shortcut
    assert _outcome(lambda: decode_request(json.dumps(request).encode(), None, ONE)) == general


def test_usual_request_takes_the_shortcut() -> None:
    request = {"id": "r", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                      "data": [1, 2]}]}  # fmt: skip
    decoded = _decode_common(request, ONE)
    assert decoded is not None and decoded.id == "r"
    np.testing.assert_array_equal(decoded.inputs["x"], np.array([[1, 2]], np.float32))
    assert _decode_common({**request, "outputs": [{"name": "y"}]}, ONE) is None


# Several inputs (token ids and their mask, as the text student takes them): the shortcut
# (`_decode_common_inputs`) must also answer exactly as the general path. Requests are drawn
# around the usual one: each field mostly right, inputs sometimes swapped, missing or extra.
TWO = Signature(
    inputs={
        "ids": TensorSpec(name="ids", datatype="INT64", shape=[-1, 2]),
        "mask": TensorSpec(name="mask", datatype="INT64", shape=[-1, 2]),
    },
    outputs=SIG.outputs,
)


def _mostly(right: object, wrong: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.just(right), st.just(right), st.just(right), wrong)


@st.composite
def _token_tensor(draw: st.DrawFn, name: str) -> dict[str, object]:
    shape = draw(
        _mostly(
            [1, 2],
            st.one_of(
                st.sampled_from([[2, 2], [2, 2], [0, 2], [1, 3], [True, 2], [1.0, 2], "2"]),
                st.lists(st.integers(-1, 3), min_size=1, max_size=3),
            ),
        )
    )
    fits = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2)
    if shape == [2, 2]:
        fits = st.lists(st.integers(0, 9), min_size=4, max_size=4)
    tensor = {
        "name": draw(_mostly(name, st.sampled_from(["ids", "mask", "x", 7]))),
        "datatype": draw(_mostly("INT64", st.sampled_from(["INT32", "FP32", "int64"]))),
        "shape": shape,
        "data": draw(
            _mostly(
                draw(fits),
                st.one_of(
                    st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=2), max_size=2),
                    st.lists(_values, max_size=4),
                    st.just("nope"),
                ),
            )
        ),
    }
    if draw(st.sampled_from(["usual"] * 9 + ["parameters"])) == "parameters":
        tensor["parameters"] = {}
    return tensor


@st.composite
def _token_requests(draw: st.DrawFn) -> dict[str, object]:
    inputs = [draw(_token_tensor("ids")), draw(_token_tensor("mask"))]
    change = draw(st.sampled_from(["none"] * 5 + ["swap", "drop", "extra"]))
    if change == "swap":
        inputs.reverse()
    elif change == "drop":
        inputs.pop()
    elif change == "extra":
        inputs.append(draw(_token_tensor("x")))
    request: dict[str, object] = {"inputs": inputs}
    extra = draw(st.sampled_from(["none"] * 4 + ["id", "bad id", "outputs"]))
    if extra != "none":
        request.update(
            {"id": "r1"} if extra == "id" else {"id": 7} if extra == "bad id" else {"outputs": []}
        )
    return request


@settings(max_examples=1500, deadline=None)
@given(_token_requests())
def test_several_inputs_shortcut_answers_as_the_general_path(request: dict[str, object]) -> None:
    general = _outcome(lambda: _decode_general(request, memoryview(b""), None, TWO))
    common = _outcome(lambda: _decode_common(request, TWO))
    assert common is None or common == general
    assert _outcome(lambda: decode_request(json.dumps(request).encode(), None, TWO)) == general


def test_several_inputs_take_the_shortcut_in_the_models_order_only() -> None:
    ids = {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}
    mask = {"name": "mask", "shape": [2, 2], "datatype": "INT64", "data": [[1, 1], [1, 0]]}
    decoded = _decode_common({"id": "r", "inputs": [ids, mask]}, TWO)
    assert decoded is not None and decoded.id == "r"
    assert decoded.inputs["ids"].dtype == np.int64 and decoded.inputs["mask"].dtype == np.int64
    np.testing.assert_array_equal(decoded.inputs["ids"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(decoded.inputs["mask"], [[1, 1], [1, 0]])
    assert decoded.outputs == (OutputRequest("y", False), OutputRequest("z", False))
    assert _decode_common({"inputs": [mask, ids]}, TWO) is None  # the general path's to decode
    swapped = decode_request(json.dumps({"inputs": [mask, ids]}).encode(), None, TWO)
    np.testing.assert_array_equal(swapped.inputs["ids"], decoded.inputs["ids"])


@pytest.mark.parametrize("order", [("ids", "mask"), ("mask", "ids")])
def test_inputs_of_different_batch_sizes_are_refused(order: tuple[str, str]) -> None:
    tensors = {
        "ids": {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
        "mask": {"name": "mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]},
    }
    body = json.dumps({"inputs": [tensors[name] for name in order]}).encode()
    sizes = {"ids": 2, "mask": 1} if order[0] == "ids" else {"mask": 1, "ids": 2}
    message = f"inputs differ in their first (batch) dimension: {sizes}"
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_request(body, None, TWO)


# Every datatype, decoded from JSON and from binary and encoded back, checked against what
# tritonclient itself sends and reads (an independent implementation of the wire format).
def _every_datatype_signature() -> Signature:
    specs = {f"in_{dt.lower()}": TensorSpec(name=f"in_{dt.lower()}", datatype=dt, shape=[-1, 3])
             for dt in DATATYPES}  # fmt: skip
    return Signature(inputs=specs, outputs=SIG.outputs)


def _triton_body(values: dict[str, np.ndarray], binary: bool) -> tuple[bytes, int | None]:
    inputs = []
    for dt, value in values.items():
        tensor = triton.InferInput(f"in_{dt.lower()}", list(value.shape), dt)
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs)
    return body, length


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_decodes_exactly(binary: bool) -> None:
    values = {dt: sample(dt, 4, seed=7) for dt in DATATYPES}
    body, length = _triton_body(values, binary)
    request = decode_request(body, length, _every_datatype_signature())
    for dt, value in values.items():
        got = request.inputs[f"in_{dt.lower()}"]
        assert got.dtype == NUMPY_DTYPES[dt] and got.shape == value.shape, dt
        np.testing.assert_array_equal(got, value, err_msg=dt)
        if dt == "BYTES":  # text, as onnxruntime takes it
            assert all(type(v) is str for v in got.flat)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_encodes_as_tritonclient_reads_it(binary: bool) -> None:
    values = {dt: sample(dt, 2, seed=8) for dt in DATATYPES}
    requested = tuple(OutputRequest(dt, binary) for dt in DATATYPES)
    body, length = encode_response(
        model_name="m", model_version="1", request_id="r", outputs=values, requested=requested
    )
    result = triton.InferResult.from_response_body(body, header_length=length)
    for dt, value in values.items():
        assert result.get_output(dt)["datatype"] == dt
        got = result.as_numpy(dt)
        expected = value if dt != "BYTES" else np.vectorize(
            (lambda s: s.encode()) if binary else (lambda s: s), otypes=[object]
        )(value)  # fmt: skip
        np.testing.assert_array_equal(got, expected, err_msg=dt)


def test_bytes_outputs_are_length_prefixed_as_triton_serialises_them() -> None:
    words = np.array([["", "a"], ["héllo", "日本"]], dtype=object)
    assert bytes_blob(words) == serialize_byte_tensor(words).item()
    assert (
        bytes_blob(np.array([b"\xff", b"x"], dtype=object))
        == b"\x01\x00\x00\x00\xff\x01\x00\x00\x00x"
    )


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    sig = Signature({"b": TensorSpec(name="b", datatype="BOOL", shape=[3])}, SIG.outputs)
    header = json.dumps({"inputs": [{"name": "b", "shape": [3], "datatype": "BOOL",
                                     "parameters": {"binary_data_size": 3}}]}).encode()  # fmt: skip
    ok = decode_request(header + b"\x01\x00\x01", len(header), sig)
    np.testing.assert_array_equal(ok.inputs["b"], [True, False, True])
    with pytest.raises(InvalidInput, match="BOOL bytes must be 0 or 1, got 2 at flat index 1"):
        decode_request(header + b"\x01\x02\x01", len(header), sig)
