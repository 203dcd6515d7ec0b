"""Open Inference Protocol datatypes: their numpy dtypes and ONNX element types, in one table.

Every module that maps between a card's `datatype`, a numpy array and an ONNX graph's
`tensor(...)` type reads this table, so a datatype is added in one place. BYTES is a tensor of
strings: numpy object arrays of `str`, what onnxruntime takes and returns for `tensor(string)`
(its Python binding turns a `bytes` element into the text "b'...'", so decoded BYTES inputs are
UTF-8 text; outputs may hold `str` or `bytes`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

Datatype = Literal[
    "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]  # fmt: skip
DATATYPES: tuple[str, ...] = get_args(Datatype)

# datatype -> numpy dtype (BYTES: object arrays holding `bytes`).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
# numpy dtype -> datatype, for encoding outputs (object arrays are BYTES).
V2_DATATYPES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in NUMPY_DTYPES.items()}

# datatype <-> onnxruntime's element type names (`NodeArg.type`).
ORT_TYPES: dict[str, str] = {
    "BOOL": "tensor(bool)",
    "UINT8": "tensor(uint8)",
    "INT8": "tensor(int8)",
    "INT16": "tensor(int16)",
    "INT32": "tensor(int32)",
    "INT64": "tensor(int64)",
    "FP16": "tensor(float16)",
    "FP32": "tensor(float)",
    "FP64": "tensor(double)",
    "BYTES": "tensor(string)",
}
FROM_ORT_TYPES: dict[str, str] = {ort: name for name, ort in ORT_TYPES.items()}

# Bytes per element in a V2 binary tensor (BYTES: variable, each element length-prefixed).
ITEM_SIZES: dict[str, int] = {
    name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"
}
