"""Tensors against a model signature: datatypes, shapes, and the checks every protocol shares.

Everything here is a pure function of its arguments, raising `InvalidInput` with a message
that says what was wrong and what was expected. The protocol codecs (V2 JSON, V2 binary, V1)
decode into numpy arrays through these functions, so one set of rules guards the model.

Per datatype, in JSON: numbers for FP16/FP32/FP64 (integers too), integers for the INT and UINT
datatypes (within the datatype's range), `true`/`false` for BOOL, strings for BYTES. In binary
(the V2 extension): little-endian values, BOOL one byte each (0 or 1), BYTES each element as a
4-byte little-endian length and that many bytes, as Triton sends them. BYTES arrays are object
arrays of `str` (onnxruntime's Python binding takes `tensor(string)` as text), so their bytes
must be UTF-8.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from kdgate.service.cards import ModelCard, TensorSpec
from kdgate.service.datatypes import NUMPY_DTYPES, V2_DATATYPES
from kdgate.service.errors import InvalidInput

# numpy kinds a JSON number may decode to, per target kind: ints are fine for a float input,
# floats are not fine for an int input (silently truncating 1.7 to 1 would change the answer).
_ACCEPTED_KINDS = {"f": ("f", "i", "u"), "i": ("i", "u"), "u": ("i", "u"), "b": ("b",)}
# What a JSON tensor must hold, per target kind, for the message that refuses anything else.
_EXPECTED = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans (true/false)"}
_FLOAT_MAX = {
    dtype: float(np.finfo(dtype).max) for dtype in NUMPY_DTYPES.values() if dtype.kind == "f"
}
# A sum of squares at most max**2 proves every value finite and within range (each square is at
# most the sum; NaN fails the comparison). For float64 only finiteness is left to prove, and a
# finite sum does that: parsed values are float64 already.
_SQUARES_MAX = {
    np.dtype(np.float16): _FLOAT_MAX[np.dtype(np.float16)] ** 2,
    np.dtype(np.float32): _FLOAT_MAX[np.dtype(np.float32)] ** 2,
    np.dtype(np.float64): _FLOAT_MAX[np.dtype(np.float64)],
}
_BYTES_LENGTH = struct.Struct("<I")  # the length before each BYTES element in binary data


@dataclass(frozen=True)
class Signature:
    """A model's input and output tensors, by name, in the model's order."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @cached_property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs)

    @cached_property
    def single_input(self) -> TensorSpec | None:
        """The input of a single-input model (the usual case), else None."""
        return next(iter(self.inputs.values())) if len(self.inputs) == 1 else None

    @cached_property
    def input_fields(self) -> tuple[tuple[str, str, TensorSpec], ...]:
        """(name, datatype, spec) of each input, in the model's order: read once, since each
        read of a pydantic model's field costs ~0.5k instructions (callgrind)."""
        return tuple((spec.name, spec.datatype, spec) for spec in self.inputs.values())

    @cached_property
    def batched_inputs(self) -> tuple[str, ...]:
        """The inputs whose first dimension is dynamic (the batch), in the model's order."""
        return tuple(name for name, spec in self.inputs.items() if spec.shape[:1] == [-1])

    @classmethod
    def from_card(cls, card: ModelCard) -> Signature:
        return cls(
            inputs={t.name: t for t in card.inputs},
            outputs={t.name: t for t in card.outputs},
        )


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor with this (fully known) shape."""
    return math.prod(shape)


def check_shape(name: str, shape: Any, spec: TensorSpec) -> tuple[int, ...]:
    """Validate a client-declared shape against the signature; -1 in the spec matches any size."""
    expected = spec.shape  # once: a field of a pydantic model costs ~0.5k instructions a read
    if type(shape) is list and len(shape) == len(expected):
        for want, got in zip(expected, shape):  # noqa: B905  (same length: checked above)
            if type(got) is not int or got <= 0 or (want != got and want != -1):
                break
        else:
            return tuple(shape)
    raise _shape_error(name, shape, spec)


def _shape_error(name: str, shape: Any, spec: TensorSpec) -> InvalidInput:
    """What is wrong with a shape `check_shape` refused, checked in the order a reader would."""
    if type(shape) is not list or not all(type(d) is int for d in shape):
        return InvalidInput(f"input {name!r}: 'shape' must be a list of integers, got {shape!r}")
    mismatch = InvalidInput(
        f"input {name!r}: shape {shape} does not match the model's {spec.shape} (-1 is any size)"
    )
    if len(shape) != len(spec.shape):
        return mismatch
    for want, got in zip(spec.shape, shape, strict=True):
        if got <= 0:
            return InvalidInput(
                f"input {name!r}: shape {shape} has a zero or negative dimension; "
                "every dimension must be >= 1"
            )
        if want != got and want != -1:
            return mismatch
    raise AssertionError(f"shape {shape} fits {spec.shape}")  # check_shape accepted it


def check_datatype(name: str, datatype: Any, spec: TensorSpec) -> np.dtype[Any]:
    """The numpy dtype for `datatype`, which must be the one the signature declares."""
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype!r} is not the model's {spec.datatype!r}"
        )
    return NUMPY_DTYPES[spec.datatype]


def array_from_data(
    name: str,
    data: Any,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    field: str = "data",
    *,
    rows: bool = False,
) -> np.ndarray[Any, Any]:
    """Decode JSON tensor data (flat or nested lists of numbers, row-major) into `shape`.

    `field` names the JSON member the data came from, for error messages; `rows`: the data is
    a list of rows (V1 instances), each of shape `shape[1:]`.
    """
    if not isinstance(data, list):
        raise InvalidInput(
            f"input {name!r}: '{field}' must be a list of "
            f"{_EXPECTED.get(dtype.kind, 'strings')}, got {_kind(data)}"
        )
    if dtype.kind == "O":
        return _strings_from_data(name, data, shape, field, rows=rows)
    try:
        # No dtype here on purpose: numpy would happily parse the string "1.5" into a float.
        raw = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(
            f"input {name!r}: '{field}' is not a rectangular list of numbers ({exc})"
        ) from None
    if raw.dtype.kind == "O" and all(type(v) in (int, float) for v in raw.flat):
        raw = _beyond_64_bits(name, raw, dtype, field)
    if raw.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        if dtype.kind in "iu" and _past_integer_range(data, raw, dtype):
            raise _out_of_range(name, field, dtype)
        raise InvalidInput(
            f"input {name!r}: '{field}' holds {_describe_kind(raw)}; "
            f"expected {_EXPECTED[dtype.kind]} for {V2_DATATYPES[dtype]}"
        )
    _check_layout(name, raw, shape, field, rows=rows)
    if dtype.kind == "f":
        # Integers (at most 64-bit once parsed) always fit FP32 and FP64. For floats, one
        # reduction (~1 us; abs + max cost ~4) clears the common case; NaN, +-Inf, out-of-range
        # values, and in-range values whose squares add up past the bound, get the exact check.
        if raw.dtype.kind == "f":
            if not np.vdot(raw, raw) <= _SQUARES_MAX[dtype]:
                check_in_range(name, raw, dtype)
        elif dtype.itemsize < 4:  # FP16: 70000 is an integer past its range
            check_in_range(name, raw.astype(np.float64), dtype)
    elif dtype.kind != "b" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise _out_of_range(name, field, dtype)
    return raw.astype(dtype, copy=False).reshape(shape)


def _check_layout(
    name: str, raw: np.ndarray[Any, Any], shape: tuple[int, ...], field: str, *, rows: bool
) -> None:
    """`raw` (parsed JSON data) holds `shape`'s element count, nested as `shape` or flat."""
    if raw.size != element_count(shape):
        raise InvalidInput(
            f"input {name!r}: '{field}' has {raw.size} values but shape {list(shape)} needs "
            f"{element_count(shape)}"
        )
    if raw.ndim > 1 and raw.shape != shape:
        # Nested data is read as nested: [2, 1, 64] is not [2, 64] (flat data has no nesting).
        if rows:
            raise InvalidInput(
                f"input {name!r}: each of the '{field}' must be one row of shape "
                f"{list(shape[1:])}, got rows of shape {list(raw.shape[1:])}"
            )
        raise InvalidInput(
            f"input {name!r}: '{field}' is nested as {list(raw.shape)}, not as shape "
            f"{list(shape)}; nest it exactly as the shape, or send it flat"
        )


def _strings_from_data(
    name: str, data: list[Any], shape: tuple[int, ...], field: str, *, rows: bool
) -> np.ndarray[Any, Any]:
    """BYTES from JSON: strings only (numpy would turn a stray number into its digits)."""
    try:
        raw = np.asarray(data, dtype=object)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(
            f"input {name!r}: '{field}' is not a rectangular list of strings ({exc})"
        ) from None
    for value in raw.flat:
        if type(value) is not str:
            raise InvalidInput(
                f"input {name!r}: '{field}' holds {_kind(value)} {value!r:.40}; "
                "expected strings for BYTES"
            )
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate escape: no UTF-8 for onnxruntime
                raise InvalidInput(
                    f"input {name!r}: '{field}' holds a string that is not valid Unicode"
                ) from None
    _check_layout(name, raw, shape, field, rows=rows)
    return raw.reshape(shape)


def _past_integer_range(data: list[Any], raw: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> bool:
    """Whether `data`, refused for an integer datatype, holds integers past its range that
    became floats on the way: numpy makes float64 of ints past 2**63 mixed with smaller ones,
    orjson of ints past 64 bits."""
    try:
        if all(type(v) is int for v in np.asarray(data, dtype=object).flat):
            return True
    except ValueError:  # ragged
        return False
    if raw.dtype.kind != "f":
        return False
    info = np.iinfo(dtype)
    return bool(((raw < info.min) | (raw > info.max)).any())


def _beyond_64_bits(
    name: str, raw: np.ndarray[Any, Any], dtype: np.dtype[Any], field: str
) -> np.ndarray[Any, Any]:
    """Numbers numpy keeps as objects (integers past 64 bits) as float64 for a float datatype
    (the range check follows); out of range for an integer one, or past float64."""
    if dtype.kind == "f":
        try:
            return raw.astype(np.float64)
        except OverflowError:
            pass
    if dtype.kind == "b":
        return raw  # refused as numbers where booleans are expected
    raise _out_of_range(name, field, dtype)


def _out_of_range(name: str, field: str, dtype: np.dtype[Any]) -> InvalidInput:
    if dtype.kind == "f":
        bounds = f"+-{_FLOAT_MAX[dtype]:.3e}"
    else:
        info = np.iinfo(dtype)
        bounds = f"[{info.min}, {info.max}]"
    return InvalidInput(
        f"input {name!r}: '{field}' holds values outside the {V2_DATATYPES[dtype]} range ({bounds})"
    )


# Per datatype: struct code (packing a flat list checks each value's type and range in C), the
# little-endian dtype of the packed bytes, and the Python type of the sum of acceptable data.
# None: a datatype the quick way leaves to `array_from_data` (every datatype has an entry: a
# subscript costs less than `dict.get` on the hot path).
_PACKING: dict[str, tuple[str, np.dtype[Any], type] | None] = dict.fromkeys(NUMPY_DTYPES) | {
    name: (code, NUMPY_DTYPES[name].newbyteorder("<"), float if code in "fd" else int)
    for name, code in {"FP32": "f", "FP64": "d", "INT32": "i", "INT64": "q"}.items()
}
_FP32_MAX_BYTES = struct.pack("<f", _FLOAT_MAX[np.dtype(np.float32)])[:3]  # the sign byte apart


def packed_from_data(
    data: list[Any], shape: tuple[int, ...], datatype: str
) -> np.ndarray[Any, Any] | None:
    """A flat list of numbers as an array of `shape`, checked the quick way; None when the quick
    way cannot vouch for `data` (`array_from_data` then decides, with its messages).

    `data` as orjson parses JSON: its ints lie within [-2**63, 2**64) (numpy would make an
    object array of larger ones, which `array_from_data` refuses).

    The usual request's data (a flat list of JSON floats) costs ~3 us here against ~9 through
    `array_from_data`, and far more in a busy server, where every numpy call finds its code and
    data evicted from the CPU caches. What it accepts, `array_from_data` accepts too, with the
    same values (tests/unit/test_tensors.py and test_protocol_v2.py compare them on generated data):
    - `sum` raises on anything but numbers (strings, null, nested lists); a finite sum shows
      that no value is NaN or infinite;
    - float datatypes need a float sum (at least one float: ints alone take the other way, which
      converts them without a detour through float64);
    - data starting with a boolean takes the other way (all booleans are refused there);
    - `struct.pack` refuses anything but ints (and bools) for int datatypes, so their data is
      not summed (~5k instructions per 64 values), and values out of the datatype's range,
      except floats just above the float32 maximum, which it rounds down to it: any FP32 data
      holding the maximum's bytes takes the other way.
    """
    packing = _PACKING[datatype]
    if packing is None or len(data) != math.prod(shape) or type(data[0]) is bool:
        return None
    code, dtype, wanted = packing
    try:
        packed = _packer(code, len(data))(*data)
        if wanted is float:
            total: float = sum(data)
            if type(total) is not float or not math.isfinite(total):
                return None
            if code == "f" and _FP32_MAX_BYTES in packed:  # may straddle two values: harmless
                return None
    except (TypeError, OverflowError, struct.error):
        return None
    # The array over the packed bytes, as np.frombuffer(packed, dtype).reshape(shape) makes
    # it (read-only, no copy) in one call: ~1.3k instructions less.
    return np.ndarray(shape, dtype, packed)


@lru_cache(maxsize=256)  # bounded: one per (datatype, element count) seen
def _packer(code: str, count: int) -> Callable[..., bytes]:
    return struct.Struct(f"<{count}{code}").pack


def array_from_bytes(
    name: str, payload: bytes | memoryview, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> np.ndarray[Any, Any]:
    """Decode raw little-endian tensor bytes (the V2 binary extension) into `shape`."""
    if dtype.kind in "bO":
        return (
            _bools_from_bytes(name, payload, shape)
            if dtype.kind == "b"
            else (_strings_from_bytes(name, payload, shape))
        )
    expected = element_count(shape) * dtype.itemsize
    if len(payload) != expected:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {len(payload)} bytes but shape {list(shape)} "
            f"of {V2_DATATYPES[dtype]} needs {expected}"
        )
    array = np.frombuffer(payload, dtype.newbyteorder("<")).reshape(shape)
    return check_finite(name, array)


def _bools_from_bytes(
    name: str, payload: bytes | memoryview, shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    """BOOL in binary: one byte per element, 0 or 1 (numpy would read 2 as a third truth)."""
    raw = np.frombuffer(payload, np.uint8)
    if raw.size != element_count(shape):
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {raw.size} bytes but shape {list(shape)} "
            f"of BOOL needs {element_count(shape)}"
        )
    if raw.max() > 1:
        raise InvalidInput(
            f"input {name!r}: BOOL bytes must be 0 or 1, got {int(raw.max())} at flat index "
            f"{int(np.argmax(raw > 1))}"
        )
    return raw.view(np.bool_).reshape(shape)


def _strings_from_bytes(
    name: str, payload: bytes | memoryview, shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    """BYTES in binary: per element a 4-byte little-endian length, then that many bytes."""
    count = element_count(shape)
    data = bytes(payload)
    items: list[str] = []
    offset = 0
    while offset < len(data) and len(items) < count:
        if offset + 4 > len(data):
            break
        (length,) = _BYTES_LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(items)} declares {length} bytes but only "
                f"{len(data) - offset} follow; expected each element as a 4-byte little-endian "
                "length and that many bytes"
            )
        try:
            items.append(data[offset : offset + length].decode())
        except UnicodeDecodeError:
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(items)} is not UTF-8 text "
                "(onnxruntime takes string tensors as text)"
            ) from None
        offset += length
    if len(items) != count or offset != len(data):
        raise InvalidInput(
            f"input {name!r}: binary data holds {len(items)} length-prefixed BYTES elements"
            f"{'' if offset == len(data) else f' and {len(data) - offset} bytes more'}; "
            f"shape {list(shape)} needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def check_in_range(name: str, array: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> None:
    """Reject non-finite values, and values a cast to float `dtype` would turn into +-Inf."""
    check_finite(name, array, dtype)
    peak = np.abs(array).max()
    if not peak <= _FLOAT_MAX[dtype]:
        raise InvalidInput(
            f"input {name!r}: value {peak} is outside the {V2_DATATYPES[dtype]} range "
            f"(+-{_FLOAT_MAX[dtype]:.3e}); expected finite numbers"
        )


def check_finite(
    name: str, array: np.ndarray[Any, Any], dtype: np.dtype[Any] | None = None
) -> np.ndarray[Any, Any]:
    """Reject NaN and +-Inf in floating point inputs (a model would answer garbage); `dtype`
    is the input's datatype when `array` is not of it yet (JSON numbers parse as float64)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array))
        first = array.reshape(-1)[bad[0]]
        datatype = V2_DATATYPES[(dtype or array.dtype).newbyteorder("=")]
        raise InvalidInput(
            f"input {name!r}: {bad.size} value(s) are not finite (first: {first} at flat index "
            f"{bad[0]}); expected finite numbers of {datatype}"
        )
    return array


def check_names(given: Sequence[str], signature: Signature) -> None:
    """Every model input exactly once, nothing else."""
    expected = list(signature.inputs)
    seen: set[str] = set()
    for name in given:
        if name not in signature.inputs:
            raise InvalidInput(f"unknown input {name!r}; the model's inputs are {expected}")
        if name in seen:
            raise InvalidInput(f"input {name!r} is given more than once")
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise InvalidInput(f"missing input(s) {missing}; the model's inputs are {expected}")


def check_batch(arrays: dict[str, np.ndarray[Any, Any]], signature: Signature) -> None:
    """The inputs with a dynamic first dimension (the batch) agree on it: one request's
    inputs describe the same rows (onnxruntime would fail inside the graph otherwise).

    `arrays` holds every input of `signature` (its names checked)."""
    batched = signature.batched_inputs
    if len(batched) < 2:
        return
    rows = len(arrays[batched[0]])
    for name in batched[1:]:
        if len(arrays[name]) != rows:
            sizes = {key: len(array) for key, array in arrays.items() if key in batched}
            raise InvalidInput(
                f"inputs differ in their first (batch) dimension: {sizes}; every input of a "
                "request must hold the same number of rows"
            )


def _kind(value: Any) -> str:
    return type(value).__name__


def _describe_kind(array: np.ndarray[Any, Any]) -> str:
    kinds = {
        "U": "strings",
        "S": "strings",
        "b": "booleans",
        "O": "mixed or non-numeric values",
        "f": "floating point numbers",
        "i": "integers",
        "u": "integers",
    }
    return kinds.get(array.dtype.kind, f"values of numpy kind {array.dtype.kind!r}")
