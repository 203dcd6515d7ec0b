"""Build and read Open Inference Protocol V2 bodies independently of service/protocol_v2.py."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def json_request(x: np.ndarray, *, name: str = "input", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        **extra,
    }


def binary_request(x: np.ndarray, *, binary_output: bool = True, **extra: Any) -> tuple[bytes, int]:
    """(body, json length) with `x` as raw little-endian FP32 after the JSON header."""
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": binary_output},
            **extra,
        }
    ).encode()
    return header + raw, len(header)


def read_binary_response(
    body: bytes, json_length: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a binary-extension response into its JSON header and outputs by name."""
    header = json.loads(body[:json_length])
    arrays = {}
    offset = json_length
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        arrays[output["name"]] = np.frombuffer(body[offset : offset + size], "<f4").reshape(
            output["shape"]
        )
        offset += size
    assert offset == len(body)
    return header, arrays
