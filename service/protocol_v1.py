"""KServe V1 (TensorFlow-Serving style) predict codec: `instances` or `inputs` -> predictions.

Requests, as TensorFlow Serving's REST API takes them:
- row format `{"instances": [row, ...]}`: each row one instance of the model's single input
  (its shape without the batch dimension), or `{"instances": [{name: row, ...}, ...]}` with
  one object per instance naming every input;
- columnar format `{"inputs": batch}` for a single-input model, or `{"inputs": {name: batch}}`.
A dynamic dimension inside a row (tokens [N, L]) takes its size from the first row's nesting.

`{"predictions": [...]}` answers both, as KServe does: the rows of the model's output, or, for a
model with several outputs, one object `{output: row}` per instance (TensorFlow Serving's row
format). BYTES travel as JSON strings. Pure functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from kdgate.service.cards import TensorSpec
from kdgate.service.datatypes import NUMPY_DTYPES
from kdgate.service.errors import InvalidInput
from kdgate.service.protocol_v2 import parse_json, texts
from kdgate.service.tensors import Signature, array_from_data, check_batch, check_names

Arrays = dict[str, np.ndarray[Any, Any]]
_FORMATS = '{"instances": [...]} or {"inputs": ...}'


def decode_request(body: bytes | memoryview, signature: Signature) -> Arrays:
    """Decode a V1 predict body into the model's inputs by name, batch-first."""
    request = parse_json(body)
    if not isinstance(request, dict) or not ("instances" in request or "inputs" in request):
        raise InvalidInput(f"request body must be a JSON object {_FORMATS}")
    spec = signature.single_input
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list of rows")
        if spec is not None and not isinstance(instances[0], dict):
            return {spec.name: _batch(spec, instances, "instances")}
        if not all(isinstance(instance, dict) for instance in instances):
            raise InvalidInput(
                f"each instance must be an object {{input name: row}} naming the model's inputs "
                f"{signature.input_names}"
            )
        for instance in instances:
            check_names(list(instance), signature)
        return {
            name: _batch(spec, [instance[name] for instance in instances], "instances")
            for name, spec in signature.inputs.items()
        }
    columns = request["inputs"]
    if spec is not None and isinstance(columns, list) and columns:
        return {spec.name: _batch(spec, columns, "inputs")}
    if not isinstance(columns, dict) or not columns:
        raise InvalidInput(
            f"'inputs' must be a non-empty object {{input name: rows}} (or, for a single-input "
            f"model, the list of rows); the body is {_FORMATS}"
        )
    check_names(list(columns), signature)
    for name, rows in columns.items():
        if not isinstance(rows, list) or not rows:
            raise InvalidInput(f"input {name!r}: 'inputs' must hold a non-empty list of rows")
    arrays = {
        name: _batch(spec, columns[name], "inputs") for name, spec in signature.inputs.items()
    }
    check_batch(arrays, signature)
    return arrays


def _batch(spec: TensorSpec, rows: list[Any], field: str) -> np.ndarray[Any, Any]:
    """`rows` (one per instance) as one batch of input `spec`."""
    row_shape = spec.shape[1:]
    if row_shape and not all(isinstance(row, list) for row in rows):
        raise InvalidInput(
            f"each instance must be a list of shape {row_shape} (input {spec.name!r})"
        )
    if any(d < 0 for d in row_shape):
        row_shape = _sizes_from_nesting(spec, row_shape, rows[0], field)
    shape = (len(rows), *row_shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    return array_from_data(spec.name, rows, shape, dtype, field, rows=True)


def _sizes_from_nesting(spec: TensorSpec, row_shape: list[int], row: Any, field: str) -> list[int]:
    """`row_shape` with each dynamic size read from `row`'s nesting (rows are not flat in V1)."""
    sizes = []
    for size in row_shape:
        if not isinstance(row, list) or not row:
            raise InvalidInput(
                f"input {spec.name!r}: each of the '{field}' must be nested as the model's row "
                f"shape {spec.shape[1:]} (-1 is any size)"
            )
        sizes.append(len(row) if size < 0 else size)
        row = row[0]
    return sizes


def encode_response(outputs: Arrays, signature: Signature) -> bytes:
    """`{"predictions": [...]}`: the output's rows, or one object by output name per instance."""
    names = signature.output_names
    if len(names) == 1:
        predictions: Any = outputs[names[0]]
        if predictions.dtype.kind == "O":  # BYTES: orjson writes no object arrays
            predictions = _nested_texts(predictions)
        return orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)
    # Python lists: orjson writes numpy arrays, not the numpy scalars a 1-D array's rows are.
    columns = [
        _nested_texts(outputs[name]) if outputs[name].dtype.kind == "O" else outputs[name].tolist()
        for name in names
    ]
    rows = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
    return orjson.dumps({"predictions": rows})


def _nested_texts(array: np.ndarray[Any, Any]) -> list[Any]:
    """A BYTES array as nested lists of strings, shaped as the array."""
    flat = np.empty(array.size, dtype=object)
    flat[:] = texts(array)
    nested: list[Any] = flat.reshape(array.shape).tolist()
    return nested
