"""Tensor checks against brute-force references: shapes, and the float range of JSON data."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdgate.service.cards import TensorSpec
from kdgate.service.errors import InvalidInput
from kdgate.service.tensors import (
    NUMPY_DTYPES,
    V2_DATATYPES,
    array_from_data,
    check_shape,
    packed_from_data,
)

FP32 = np.dtype(np.float32)
FP64 = np.dtype(np.float64)
FP32_MAX = float(np.finfo(np.float32).max)


def _accepted(values: list[float], dtype: np.dtype[np.floating]) -> bool:
    """The reference: every value finite and, as a float of `dtype`, still finite."""
    limit = float(np.finfo(dtype).max)
    return all(math.isfinite(v) and abs(v) <= limit for v in values)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([FP32_MAX, -FP32_MAX, 3.4028236e38, 1e300, -0.0]),
        ),
        min_size=1,
        max_size=70,
    ),
    st.sampled_from([FP32, FP64]),
)
def test_float_data_is_accepted_exactly_when_finite_and_in_range(
    values: list[float], dtype: np.dtype[np.floating]
) -> None:
    try:
        array = array_from_data("x", values, (len(values),), dtype)
    except InvalidInput as exc:
        assert not _accepted(values, dtype), exc.message
        assert "not finite" in exc.message or "outside the" in exc.message
    else:
        assert _accepted(values, dtype)
        np.testing.assert_array_equal(array, np.asarray(values, dtype=dtype))


def test_many_large_in_range_values_pass_although_their_squares_overflow() -> None:
    # The one-reduction shortcut fails for these (sum of squares > max**2): the exact check runs.
    values = [3e38] * 64
    assert array_from_data("x", values, (1, 64), FP32).shape == (1, 64)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, float("nan")], "not finite .* of FP32$"),
        ([float("-inf")], "not finite .* of FP32$"),
        ([1e39, -1e39], "outside the FP32 range"),
    ],
)
def test_bad_float_data_is_named(values: list[float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        array_from_data("x", values, (len(values),), FP32)


@pytest.mark.parametrize(
    ("values", "dtype", "accepted"),
    [
        ([10**30, 1], FP32, True),  # past 64-bit integers, within FP32
        ([-(10**300), 1.5], FP64, True),
        ([10**39, 1], FP32, False),
        ([10**400, 1], FP64, False),
        ([10**400], FP32, False),
        ([2**64], np.dtype(np.int64), False),
        ([-(10**400)], np.dtype(np.int32), False),
    ],
)
def test_integers_past_64_bits_are_numbers_in_or_out_of_range(
    values: list[int | float], dtype: np.dtype[np.generic], accepted: bool
) -> None:
    if accepted:
        decoded = array_from_data("x", values, (len(values),), dtype)
        np.testing.assert_array_equal(decoded, np.array([float(v) for v in values], dtype))
        return
    with pytest.raises(InvalidInput, match=f"outside the {V2_DATATYPES[dtype]} range"):
        array_from_data("x", values, (len(values),), dtype)


@pytest.mark.parametrize(
    ("data", "shape", "message"),
    [
        ([[[1.0] * 4]] * 2, (2, 4), r"nested as \[2, 1, 4\], not as shape \[2, 4\]"),
        ([[1.0] * 8], (2, 4), r"nested as \[1, 8\]"),
        ([[1.0] * 2] * 4, (2, 4), r"nested as \[4, 2\]"),
    ],
)
def test_nested_data_must_be_nested_as_the_shape(
    data: list[object], shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        array_from_data("x", data, shape, FP32)
    # The same numbers flat, or nested as the shape, are fine.
    flat = np.asarray(data, np.float32).reshape(-1)
    np.testing.assert_array_equal(array_from_data("x", flat.tolist(), shape, FP32), 1.0)
    nested = flat.reshape(shape).tolist()
    np.testing.assert_array_equal(array_from_data("x", nested, shape, FP32), 1.0)


SPEC = TensorSpec(name="x", datatype="FP32", shape=[-1, 3])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2, 3], None),
        ([1, 4], r"does not match the model's \[-1, 3\]"),
        ([3], "does not match"),
        ([0, 3], "zero or negative dimension"),
        ([-1, 3], "zero or negative dimension"),
        ([1.0, 3], "must be a list of integers"),
        ([True, 3], "must be a list of integers"),
        ("2,3", "must be a list of integers"),
    ],
)
def test_check_shape(shape: object, message: str | None) -> None:
    if message is None:
        assert check_shape("x", shape, SPEC) == (2, 3)
        return
    with pytest.raises(InvalidInput, match=message):
        check_shape("x", shape, SPEC)


_DATATYPES = ["FP32", "FP64", "INT32", "INT64"]
_any_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=32),
    st.integers(-(2**63), 2**64 - 1),  # orjson's ints: larger ones parse as floats
    st.sampled_from(
        [FP32_MAX, -FP32_MAX, 3.4028236e38, -3.4028236e38, 3.4028237e38, 2**31, -(2**31) - 1,
         2**53 + 1, 2**24 + 1, 1e-46, -0.0, True, False, None, "1.5", [1.0]]
    ),
)  # fmt: skip


def _decoded(decode: object) -> object:
    """An array as (dtype, shape, values, signs of zeros), or the refusal's message."""
    try:
        array = decode() if callable(decode) else decode
    except InvalidInput as exc:
        return exc.message
    assert isinstance(array, np.ndarray)
    return array.dtype.newbyteorder("="), array.shape, array.tolist(), np.signbit(array).tolist()


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(_any_value, min_size=1, max_size=8) | st.lists(st.floats(-1e6, 1e6), min_size=1),
    st.sampled_from(_DATATYPES),
)
def test_packed_data_is_what_array_from_data_decodes(values: list[object], datatype: str) -> None:
    """The quick way either declines (None) or returns exactly the general decoder's array."""
    shape = (1, len(values))
    quick = packed_from_data(values, shape, datatype)
    general = _decoded(lambda: array_from_data("x", values, shape, NUMPY_DTYPES[datatype]))
    assert quick is None or _decoded(quick) == general


def test_packed_data_takes_the_usual_request() -> None:
    values = [0.0, 5.0, 13.0, -1.5] * 16
    quick = packed_from_data(values, (1, 64), "FP32")
    assert quick is not None and quick.dtype == np.float32 and quick.shape == (1, 64)
    np.testing.assert_array_equal(quick, np.array([values], np.float32))
    assert packed_from_data(values, (2, 64), "FP32") is None  # 64 values for 128 elements
    assert packed_from_data([True, *values[1:]], (1, 64), "FP32") is None
    assert packed_from_data([1, 2], (1, 2), "FP32") is None  # ints alone: the exact way
    assert packed_from_data([1.5, 2.0], (1, 2), "INT64") is None


INTEGER_DATATYPES = ("UINT8", "INT8", "INT16", "INT32", "INT64")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(INTEGER_DATATYPES),
    st.lists(st.integers(min_value=-(2**66), max_value=2**66), min_size=1, max_size=4),
)
def test_integer_data_is_accepted_exactly_within_the_datatypes_range(
    datatype: str, values: list[int]
) -> None:
    dtype = NUMPY_DTYPES[datatype]
    low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)  # the reference
    shape = (len(values),)
    if all(low <= v <= high for v in values):
        got = array_from_data("x", values, shape, dtype)
        assert got.dtype == dtype and got.tolist() == values
    else:
        with pytest.raises(InvalidInput, match=f"outside the {datatype} range"):
            array_from_data("x", values, shape, dtype)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.integers(min_value=-100_000, max_value=100_000),
            st.sampled_from([65504.0, -65504.0, 65519.0, 65520.0, 65504, 65505]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fp16_data_is_accepted_exactly_when_finite_and_in_range(values: list[float]) -> None:
    dtype = NUMPY_DTYPES["FP16"]
    if _accepted([float(v) for v in values], dtype):
        got = array_from_data("x", values, (len(values),), dtype)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, np.array(values, np.float64).astype(np.float16))
    else:
        with pytest.raises(InvalidInput, match="FP16"):
            array_from_data("x", values, (len(values),), dtype)


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BOOL", [[True, False], [False, True]], np.array([[1, 0], [0, 1]], bool)),
        ("BYTES", ["a", "é"], np.array(["a", "é"], dtype=object)),
        ("BYTES", [["", "日本"]], np.array([["", "日本"]], dtype=object)),
        ("UINT8", [0, 255], np.array([0, 255], np.uint8)),
        ("FP16", [1, 0.5], np.array([1, 0.5], np.float16)),
    ],
)
def test_json_data_of_every_kind(datatype: str, data: list[object], expected: np.ndarray) -> None:
    got = array_from_data("x", data, expected.shape, NUMPY_DTYPES[datatype])
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("BOOL", [1, 0], "holds integers; expected booleans (true/false) for BOOL"),
        ("BOOL", [2**70, 0], "expected booleans (true/false) for BOOL"),
        ("BYTES", ["a", 1], "holds int 1; expected strings for BYTES"),
        ("BYTES", ["a", ["b"]], "expected strings for BYTES"),
        ("BYTES", ["a", "\ud800"], "not valid Unicode"),
        ("BYTES", "ab", "must be a list of strings"),
        ("INT8", [1.0, 2], "holds floating point numbers; expected integers for INT8"),
        ("INT64", [0, 2**63], "outside the INT64 range"),
        ("UINT8", [True, False], "holds booleans; expected integers for UINT8"),
    ],
)
def test_json_data_of_the_wrong_kind_is_named(datatype: str, data: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        array_from_data("x", data, (2,), NUMPY_DTYPES[datatype])


def test_packed_path_declines_datatypes_it_cannot_vouch_for() -> None:
    for datatype in ("BOOL", "UINT8", "INT8", "INT16", "FP16", "BYTES"):
        assert packed_from_data([1, 2], (2,), datatype) is None
