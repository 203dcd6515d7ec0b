"""KServe V1 (TensorFlow-Serving style) predict codec: `{"instances": [...]}` -> predictions.

Each instance is one row of the model's single input (its shape without the batch dimension);
the rows are stacked into one batch. Predictions are the first output's rows. Pure functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from kdgate.service.datatypes import NUMPY_DTYPES
from kdgate.service.errors import InvalidInput
from kdgate.service.protocol_v2 import parse_json
from kdgate.service.tensors import Signature, array_from_data


def decode_request(
    body: bytes | memoryview, signature: Signature
) -> dict[str, np.ndarray[Any, Any]]:
    """Decode `{"instances": [...]}` into the model's single input, batch-first."""
    if len(signature.inputs) != 1:
        raise InvalidInput(
            f"V1 instances need a single-input model; this one has {list(signature.inputs)}: "
            "use the V2 infer endpoint"
        )
    request = parse_json(body)
    if not isinstance(request, dict) or "instances" not in request:
        raise InvalidInput('request body must be a JSON object {"instances": [...]}')
    instances = request["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list of rows")
    ((name, spec),) = signature.inputs.items()
    row_shape = spec.shape[1:]
    if any(d < 0 for d in row_shape):
        raise InvalidInput(f"V1 instances need a fixed row shape; the model's is {spec.shape}")
    if not all(isinstance(row, list) for row in instances):
        raise InvalidInput(
            f"each instance must be a list of numbers of shape {row_shape} (input {name!r})"
        )
    shape = (len(instances), *row_shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    return {name: array_from_data(name, instances, shape, dtype, "instances", rows=True)}


def encode_response(outputs: dict[str, np.ndarray[Any, Any]], signature: Signature) -> bytes:
    """`{"predictions": [...]}`: one row of the model's first output per instance."""
    first = next(iter(signature.outputs))
    return orjson.dumps({"predictions": outputs[first]}, option=orjson.OPT_SERIALIZE_NUMPY)
