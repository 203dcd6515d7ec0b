"""Open Inference Protocol (KServe V2) infer codec, with the binary tensor data extension.

Request: a JSON header, optionally followed by raw tensor bytes. When the
`Inference-Header-Content-Length` header is present, the first that-many bytes of the body are
the JSON and the rest is the concatenation of every input that declares
`parameters.binary_data_size`, in request order. Response outputs are JSON `data`, or raw bytes
after the JSON when `binary_data` (per output) or `binary_data_output` (per request) asks for it,
with the JSON length in the response's `Inference-Header-Content-Length`.

Pure functions: bytes in, arrays out, and back. No HTTP, no model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, NamedTuple

import numpy as np
import orjson

from kdgate.service.datatypes import NUMPY_DTYPES, V2_DATATYPES
from kdgate.service.errors import InvalidInput
from kdgate.service.tensors import (
    Signature,
    array_from_bytes,
    array_from_data,
    check_batch,
    check_datatype,
    check_names,
    check_shape,
    packed_from_data,
)

HEADER_LENGTH = "inference-header-content-length"
MAX_ID_LENGTH = 256

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class OutputRequest:
    """One output the caller wants back, and whether as raw bytes."""

    name: str
    binary: bool


class V2Request(NamedTuple):
    """A decoded, validated inference request (a NamedTuple: built per request, ~3x cheaper
    than a frozen dataclass)."""

    id: str | None
    inputs: Arrays
    outputs: tuple[OutputRequest, ...]


# tuple.__new__ with the class: a V2Request from its fields without running the NamedTuple's
# Python-level __new__ (~1k instructions less per request, callgrind).
_v2_request: Callable[[tuple[str | None, Arrays, tuple[OutputRequest, ...]]], V2Request] = partial(
    tuple.__new__, V2Request
)


def valid_request_id(value: object) -> bool:
    """Whether a client-chosen request id can be echoed in a response header as is."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
    )


def parse_json(body: bytes | memoryview, what: str = "request body") -> Any:
    """Parse JSON; NaN/Infinity literals are accepted here so that validation can name them."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            # The non-standard NaN/Infinity literals (Python's json.dumps writes them) are not
            # malformed JSON from the caller's point of view: parse them, then reject the value
            # with a message that says "not finite". Only error bodies reach this branch.
            return json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def parse_header_length(value: bytes | str | None, body_size: int) -> int | None:
    """Validate the `Inference-Header-Content-Length` header against the body size."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(
            f"{HEADER_LENGTH} must be an integer byte count, got {value!r}"
        ) from None
    if not 0 < length <= body_size:
        raise InvalidInput(
            f"{HEADER_LENGTH} is {length} but the body has {body_size} bytes; "
            "expected the length of the JSON part, between 1 and the body size"
        )
    return length


def decode_request(
    body: bytes | memoryview, header_length: int | None, signature: Signature
) -> V2Request:
    """Decode and validate an infer request body against the model signature."""
    if header_length is None:
        text, binary = body, memoryview(b"")
    else:
        view = memoryview(body)
        text, binary = view[:header_length], view[header_length:]
    try:
        request = orjson.loads(text)
    except orjson.JSONDecodeError:
        # NaN/Infinity literals, numbers past float64: parse_json reads them so that validation
        # can name them, and only the general path sees such requests (_decode_common takes
        # JSON as orjson parses it).
        request = parse_json(text)
    else:
        if not binary and (common := _decode_common(request, signature)) is not None:
            return common
    return _decode_general(request, binary, header_length, signature)


def _decode_common(request: Any, signature: Signature) -> V2Request | None:
    """The usual request in fewer steps, or None when it is not one: take `_decode_general`.

    `request` as orjson parses JSON (see `packed_from_data`).

    Usual: one JSON tensor for a single-input model, right name and datatype, a valid or no
    `id`, and no other members (no `parameters`, no `outputs`). The shape and data checks are
    the general path's own functions (data first the quick way, `packed_from_data`), and nothing
    the general path checks before them can fail here, so a bad request gets the same error
    either way (tests/unit/test_protocol_v2.py compares both on generated requests).
    """
    spec = signature.single_input
    if spec is None:
        return _decode_common_inputs(request, signature)
    if type(request) is not dict or not request.keys() <= _COMMON_REQUEST:
        return None
    inputs, request_id = request.get("inputs"), request.get("id")
    if type(inputs) is not list or len(inputs) != 1:
        return None
    if request_id is not None and not valid_request_id(request_id):
        return None
    tensor = inputs[0]
    if (
        type(tensor) is not dict
        or tensor.keys() != _COMMON_TENSOR
        or tensor["name"] != spec.name
        or tensor["datatype"] != spec.datatype
    ):
        return None
    shape = check_shape(spec.name, tensor["shape"], spec)
    data = tensor["data"]
    array = packed_from_data(data, shape, spec.datatype) if type(data) is list else None
    if array is None:
        array = array_from_data(spec.name, data, shape, NUMPY_DTYPES[spec.datatype])
    # All outputs as JSON: `signature_outputs(signature, binary=False)` without its frame.
    return _v2_request(
        (request_id, {spec.name: array}, _all_outputs(signature.output_names, False))
    )


def _decode_common_inputs(request: Any, signature: Signature) -> V2Request | None:
    """`_decode_common` for a model of several inputs (token ids and their mask): usual when
    every input is one JSON tensor, in the model's order, of the right name and datatype.

    All of that is looked at before any input is checked further, so the checks that can fail
    (shape, data, then the batch dimension) come in the general path's order, with its errors.
    Two INT64 inputs of 64 tokens, the JSON parsed: ~63k instructions the general way, ~59k
    this way (callgrind)."""
    fields = signature.input_fields
    if type(request) is not dict or not request.keys() <= _COMMON_REQUEST:
        return None
    tensors, request_id = request.get("inputs"), request.get("id")
    if type(tensors) is not list or len(tensors) != len(fields):
        return None
    if request_id is not None and not valid_request_id(request_id):
        return None
    for tensor, (name, datatype, _) in zip(tensors, fields):  # noqa: B905  (same length)
        if (
            type(tensor) is not dict
            or tensor.keys() != _COMMON_TENSOR
            or tensor["name"] != name
            or tensor["datatype"] != datatype
        ):
            return None
    inputs: Arrays = {}
    for tensor, (name, datatype, spec) in zip(tensors, fields):  # noqa: B905
        shape = check_shape(name, tensor["shape"], spec)
        data = tensor["data"]
        array = packed_from_data(data, shape, datatype) if type(data) is list else None
        if array is None:
            array = array_from_data(name, data, shape, NUMPY_DTYPES[datatype])
        inputs[name] = array
    check_batch(inputs, signature)
    return _v2_request((request_id, inputs, _all_outputs(signature.output_names, False)))


_COMMON_REQUEST = frozenset(("inputs", "id"))
_COMMON_TENSOR = frozenset(("name", "shape", "datatype", "data"))


def _decode_general(
    request: Any, binary: memoryview, header_length: int | None, signature: Signature
) -> V2Request:
    """Any request: several inputs, binary tensors, `parameters`, `outputs` selection."""
    if not isinstance(request, dict):
        raise InvalidInput(
            f"request body must be a JSON object with 'inputs', got {type(request).__name__}"
        )
    request_id = request.get("id")
    if request_id is not None and not valid_request_id(request_id):
        raise InvalidInput(
            f"'id' must be a string of 1 to {MAX_ID_LENGTH} printable ASCII characters "
            "(it is echoed in the x-request-id header)"
        )
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors {name, shape, datatype}")
    names = [_input_name(t) for t in raw_inputs]
    if names != signature.input_names:  # the common case skips the general check
        check_names(names, signature)

    inputs: Arrays = {}
    offset = 0
    for tensor in raw_inputs:
        name = tensor["name"]
        spec = signature.inputs[name]
        dtype = check_datatype(name, tensor.get("datatype"), spec)
        shape = check_shape(name, tensor.get("shape"), spec)
        parameters = tensor.get("parameters")
        size = None if parameters is None else _binary_size(name, _parameters(tensor, name))
        if size is None:
            # The quick way first, as `_decode_common` does: two INT64 token inputs of 64 ids
            # cost ~50 us the other way, ~15 this way (bench/workloads.py text).
            data = tensor.get("data")
            quick = packed_from_data(data, shape, spec.datatype) if type(data) is list else None
            inputs[name] = quick if quick is not None else array_from_data(name, data, shape, dtype)
            continue
        if "data" in tensor:
            raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size; send one")
        if header_length is None:
            raise InvalidInput(
                f"input {name!r} declares binary_data_size but the request has no "
                f"{HEADER_LENGTH} header saying where the JSON ends"
            )
        if offset + size > len(binary):
            raise InvalidInput(
                f"binary payload truncated: input {name!r} needs bytes {offset}..{offset + size} "
                f"of the binary part, which has {len(binary)}"
            )
        inputs[name] = array_from_bytes(name, binary[offset : offset + size], shape, dtype)
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"binary payload inconsistent: {len(binary)} bytes follow the JSON but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    if len(inputs) > 1:
        check_batch(inputs, signature)
    return _v2_request((request_id, inputs, _requested_outputs(request, signature)))


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Arrays,
    requested: tuple[OutputRequest, ...],
) -> tuple[bytes, int | None]:
    """Encode the infer response: (body, JSON length when binary outputs follow it, else None)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for wanted in requested:
        array = outputs[wanted.name]
        datatype = V2_DATATYPES[array.dtype]
        entry: dict[str, Any] = {"name": wanted.name, "datatype": datatype, "shape": array.shape}
        if wanted.binary:
            blob = (
                bytes_blob(array)
                if datatype == "BYTES"
                else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # ravel: a view, as reshape(-1), at half its cost. orjson writes numpy arrays of
            # every datatype but BYTES (object arrays) itself.
            entry["data"] = array.ravel() if datatype != "BYTES" else texts(array)
        tensors.append(entry)
    header = orjson.dumps(
        {
            "model_name": model_name,
            "model_version": model_version,
            "id": request_id,
            "outputs": tensors,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def bytes_blob(array: np.ndarray[Any, Any]) -> bytes:
    """A BYTES tensor in binary: per element (row-major) a 4-byte little-endian length, then
    the element's bytes (`str` elements as UTF-8), as Triton writes them."""
    parts: list[bytes] = []
    for value in array.flat:
        item = value.encode() if isinstance(value, str) else bytes(value)
        parts += (_LENGTH.pack(len(item)), item)
    return b"".join(parts)


def texts(array: np.ndarray[Any, Any]) -> list[str]:
    """A BYTES tensor as JSON strings, flat (bytes that are not UTF-8 with U+FFFD in place)."""
    return [
        value if isinstance(value, str) else bytes(value).decode(errors="replace")
        for value in array.flat
    ]


_LENGTH = struct.Struct("<I")


def signature_outputs(signature: Signature, *, binary: bool) -> tuple[OutputRequest, ...]:
    """Every output of the model, all JSON or all binary (the default when none are named)."""
    return _all_outputs(signature.output_names, binary)


@lru_cache(maxsize=64)
def _all_outputs(names: tuple[str, ...], binary: bool) -> tuple[OutputRequest, ...]:
    return tuple(OutputRequest(name, binary) for name in names)


def _input_name(tensor: Any) -> str:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise InvalidInput("each entry of 'inputs' must be an object with a string 'name'")
    return str(tensor["name"])


def _parameters(entry: dict[str, Any], owner: str | None) -> dict[str, Any]:
    """`entry["parameters"]` of input/output `owner` (None: the request), checked."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        where = "request" if owner is None else repr(owner)
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return parameters


def _binary_size(name: str, parameters: dict[str, Any]) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(
            f"input {name!r}: binary_data_size must be a byte count >= 0, got {size!r}"
        )
    return size


def _binary_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} must be true or false, got {value!r}")
    return value


def _requested_outputs(request: dict[str, Any], signature: Signature) -> tuple[OutputRequest, ...]:
    raw = request.get("outputs")
    if raw is None and "parameters" not in request:
        return signature_outputs(signature, binary=False)
    parameters = _parameters(request, None)
    default = _binary_flag(parameters.get("binary_data_output", False), "binary_data_output")
    if raw is None:
        return signature_outputs(signature, binary=default)
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list of {name} objects")
    requested = []
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput("each entry of 'outputs' must be an object with a string 'name'")
        name = entry["name"]
        if name not in signature.outputs:
            raise InvalidInput(
                f"unknown output {name!r}; the model's outputs are {list(signature.outputs)}"
            )
        flag = _parameters(entry, name).get("binary_data", default)
        requested.append(OutputRequest(name, _binary_flag(flag, f"output {name!r} binary_data")))
    return tuple(requested)
