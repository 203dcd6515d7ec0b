"""The V1 codec: row and columnar requests, named inputs, every datatype, several outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdgate.service.cards import TensorSpec
from kdgate.service.errors import InvalidInput
from kdgate.service.protocol_v1 import decode_request, encode_response
from kdgate.service.tensors import Signature

TEXT = Signature(
    inputs={
        "input_ids": TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
        "attention_mask": TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1]),
    },
    outputs={
        "label": TensorSpec(name="label", datatype="BYTES", shape=[-1]),
        "probabilities": TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
    },
)
IMAGE = Signature(
    inputs={"pixels": TensorSpec(name="pixels", datatype="UINT8", shape=[-1, 2, 2, 2])},
    outputs={"logits": TensorSpec(name="logits", datatype="FP32", shape=[-1, 3])},
)


def decode(body: object, signature: Signature) -> dict[str, np.ndarray]:
    return decode_request(json.dumps(body).encode(), signature)


def test_rows_of_the_single_input_keep_their_shape_and_datatype() -> None:
    pixels = np.arange(16, dtype=np.uint8).reshape(2, 2, 2, 2)
    for body in ({"instances": pixels.tolist()}, {"inputs": pixels.tolist()}):
        got = decode(body, IMAGE)["pixels"]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, pixels)


def test_named_instances_and_named_columns_decode_alike() -> None:
    ids, mask = [[1, 2, 3], [4, 5, 6]], [[1, 1, 0], [1, 0, 0]]
    rows = {
        "instances": [{"attention_mask": m, "input_ids": i} for i, m in zip(ids, mask, strict=True)]
    }
    columns = {"inputs": {"input_ids": ids, "attention_mask": mask}}
    for body in (rows, columns):
        got = decode(body, TEXT)
        np.testing.assert_array_equal(got["input_ids"], ids)
        np.testing.assert_array_equal(got["attention_mask"], mask)
        assert got["input_ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": [{"input_ids": [1]}]}, r"missing input\(s\) \['attention_mask'\]"),
        ({"instances": [{"input_ids": [1], "attention_mask": [1], "x": [1]}]}, "unknown input 'x'"),
        ({"instances": [[1, 2]]}, "each instance must be an object"),
        ({"inputs": [[1, 2]]}, "'inputs' must be a non-empty object"),
        ({"inputs": {"input_ids": [[1], [2]], "attention_mask": [[1]]}}, "first \\(batch\\) dim"),
        ({"inputs": {"input_ids": [], "attention_mask": [[1]]}}, "non-empty list of rows"),
        (
            {
                "instances": [{"input_ids": [1], "attention_mask": [1]}] * 2
                + [{"input_ids": [1, 2], "attention_mask": [1, 2]}]
            },
            "not a rectangular list",
        ),
        ({"predict": []}, r'\{"instances": \[\.\.\.\]\}'),
    ],
)
def test_bad_requests_say_what_was_expected(body: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode(body, TEXT)


def test_one_output_answers_its_rows() -> None:
    logits = np.array([[0.5, 1.0, -2.0]], np.float32)
    assert json.loads(encode_response({"logits": logits}, IMAGE)) == {
        "predictions": [[0.5, 1.0, -2.0]]
    }


def test_several_outputs_answer_one_object_per_instance() -> None:
    outputs = {
        "label": np.array(["cat", "dog"], dtype=object),
        "probabilities": np.array([[0.75, 0.25], [0.5, 0.5]], np.float32),
    }
    assert json.loads(encode_response(outputs, TEXT)) == {
        "predictions": [
            {"label": "cat", "probabilities": [0.75, 0.25]},
            {"label": "dog", "probabilities": [0.5, 0.5]},
        ]
    }


def test_bytes_and_bool_outputs_are_json_strings_and_booleans() -> None:
    sig = Signature(
        inputs=TEXT.inputs, outputs={"y": TensorSpec(name="y", datatype="BYTES", shape=[-1, 2])}
    )
    words = np.array([["a", b"b"], ["\u00e9", b"\xc3\xa9"]], dtype=object)
    assert json.loads(encode_response({"y": words}, sig)) == {
        "predictions": [["a", "b"], ["\u00e9", "\u00e9"]]
    }
    flags = Signature(
        inputs=TEXT.inputs, outputs={"f": TensorSpec(name="f", datatype="BOOL", shape=[-1])}
    )
    assert json.loads(encode_response({"f": np.array([True, False])}, flags)) == {
        "predictions": [True, False]
    }
