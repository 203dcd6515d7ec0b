"""Every bad input of issue 3's Done-when gets its 4xx and a message saying what was wrong."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.anyio

URL = "/v2/models/digits/infer"
ROW = [1.0] * 64


def tensor(**overrides: Any) -> dict[str, Any]:
    return {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW, **overrides}


def body(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def binary(raw: bytes, declared: int, header_extra: int = 0) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {"inputs": [tensor(data=None, parameters={"binary_data_size": declared})]}
    ).replace(', "data": null', "")
    encoded = header.encode()
    return encoded + raw, {"inference-header-content-length": str(len(encoded) + header_extra)}


ONE_ROW = np.ones((1, 64), "<f4").tobytes()

# (case, url, body, headers, status, fragments of the message)
CASES: list[tuple[str, str, bytes, dict[str, str], int, tuple[str, ...]]] = [
    ("malformed JSON", URL, b'{"inputs": [', {}, 400, ("not valid JSON",)),
    ("not an object", URL, b"[1, 2]", {}, 400, ("JSON object",)),
    ("missing input (none given)", URL, b'{"inputs": []}', {}, 400,
     ("'inputs' must be a non-empty list",)),
    ("unknown input name", URL, body(tensor(name="pixels")), {}, 400,
     ("unknown input 'pixels'", "['input']")),
    ("input without a name", URL, b'{"inputs": [{"shape": [1]}]}', {}, 400, ("string 'name'",)),
    ("input given twice", URL, body(tensor(), tensor()), {}, 400, ("more than once",)),
    ("wrong shape", URL, body(tensor(shape=[1, 63], data=ROW[:63])), {}, 400,
     ("shape [1, 63] does not match", "[-1, 64]")),
    ("wrong rank", URL, body(tensor(shape=[64])), {}, 400, ("does not match",)),
    ("shape/data length mismatch", URL, body(tensor(shape=[2, 64])), {}, 400,
     ("has 64 values but shape [2, 64] needs 128",)),
    ("zero dimension", URL, body(tensor(shape=[0, 64], data=[])), {}, 400,
     ("zero or negative dimension",)),
    ("negative dimension", URL, body(tensor(shape=[-1, 64])), {}, 400,
     ("zero or negative dimension",)),
    ("wrong datatype", URL, body(tensor(datatype="INT64")), {}, 400,
     ("datatype 'INT64' is not the model's 'FP32'",)),
    ("string data", URL, body(tensor(data=["1.0"] * 64)), {}, 400, ("holds strings",)),
    ("boolean data", URL, body(tensor(data=[True] * 64)), {}, 400, ("holds booleans",)),
    ("ragged data", URL, body(tensor(data=[[1.0] * 32, [1.0] * 33])), {}, 400,
     ("not a rectangular list",)),
    ("NaN", URL, json.dumps({"inputs": [tensor(data=[float("nan"), *ROW[1:]])]}).encode(), {},
     400, ("not finite", "nan", "finite numbers of FP32")),
    ("Inf", URL, json.dumps({"inputs": [tensor(data=[*ROW[1:], float("inf")])]}).encode(), {},
     400, ("not finite", "inf", "finite numbers of FP32")),
    ("nested deeper than the shape", URL,
     body(tensor(shape=[2, 64], data=[[ROW]] * 2)), {}, 400,
     ("nested as [2, 1, 64], not as shape [2, 64]",)),
    ("integer past float64", URL, body(tensor(data=[10**400, *ROW[1:]])), {}, 400,
     ("outside the FP32 range",)),
    ("overflow to Inf in FP32", URL, body(tensor(data=[1e+39, *ROW[1:]])), {}, 400,
     ("outside the FP32 range",)),
    ("truncated binary payload", URL, *binary(ONE_ROW[:100], len(ONE_ROW)), 400,
     ("truncated",)),
    ("inconsistent binary size", URL, *binary(ONE_ROW, 128), 400,
     ("binary_data_size is 128 bytes", "needs 256")),
    ("trailing binary bytes", URL, *binary(ONE_ROW + b"\0" * 8, len(ONE_ROW)), 400,
     ("inconsistent",)),
    ("header length past the body", URL, *binary(ONE_ROW, len(ONE_ROW), header_extra=10_000),
     400, ("inference-header-content-length",)),
    ("binary size without header", URL,
     binary(ONE_ROW, len(ONE_ROW))[0][: binary(ONE_ROW, len(ONE_ROW))[0].index(b"}]}") + 3],
     {}, 400, ("no inference-header-content-length",)),
    ("NaN in binary", URL, *binary(np.full((1, 64), np.nan, "<f4").tobytes(), 256), 400,
     ("not finite",)),
    ("unknown output", URL,
     json.dumps({"inputs": [tensor()], "outputs": [{"name": "probs"}]}).encode(), {}, 400,
     ("unknown output 'probs'", "['logits']")),
    ("non-string id", URL, json.dumps({"id": 7, "inputs": [tensor()]}).encode(), {}, 400,
     ("'id' must be a string",)),
    ("body over the limit", URL, b"{" + b" " * (64 * 1024) + b"}", {}, 413,
     ("over the 65536-byte limit",)),
    ("unknown model", "/v2/models/cats/infer", body(tensor()), {}, 404,
     ("unknown model 'cats'", "['digits']")),
    ("unknown version", "/v2/models/digits/versions/9/infer", body(tensor()), {}, 404,
     ("no version '9'", "['1']")),
    ("V1 malformed JSON", "/v1/models/digits:predict", b"{", {}, 400, ("not valid JSON",)),
    ("V1 without instances", "/v1/models/digits:predict", b'{"inputs": []}', {}, 400,
     ('{"instances": [...]}',)),
    ("V1 short row", "/v1/models/digits:predict", json.dumps({"instances": [ROW[:5]]}).encode(),
     {}, 400, ("'instances' has 5 values but shape [1, 64] needs 64",)),
    ("V1 string row", "/v1/models/digits:predict",
     json.dumps({"instances": [["a"] * 64]}).encode(), {}, 400, ("holds strings",)),
    ("V1 3-D instance", "/v1/models/digits:predict",
     json.dumps({"instances": [[ROW]]}).encode(), {}, 400,
     ("must be one row of shape [64], got rows of shape [1, 64]",)),
    ("V1 integer past float64", "/v1/models/digits:predict",
     json.dumps({"instances": [[10**400, *ROW[1:]]]}).encode(), {}, 400,
     ("outside the FP32 range",)),
    ("V1 unknown model", "/v1/models/cats:predict", b'{"instances": [[1]]}', {}, 404,
     ("unknown model 'cats'",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "content", "headers", "status", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_input_gets_a_4xx_that_says_what_was_wrong(
    client: httpx.AsyncClient,
    url: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    fragments: tuple[str, ...],
) -> None:
    response = await client.post(url, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"}
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message
    assert response.headers["x-kdgate-model-version"]
    assert response.headers["x-request-id"]


async def test_streamed_body_over_the_limit_is_cut_off(client: httpx.AsyncClient) -> None:
    """No content-length: the limit is enforced while reading, not only from the header."""
    sent = 0

    async def chunks():  # type: ignore[no-untyped-def]
        nonlocal sent
        for _ in range(100):
            sent += 4096
            yield b" " * 4096

    response = await client.post(URL, content=chunks())
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


@pytest.mark.parametrize(
    "url", [URL + "/", "/v2/models/digits/versions/1/infer/", "/v1/models/digits:predict/"]
)
async def test_a_trailing_slash_is_404_not_a_redirect(client: httpx.AsyncClient, url: str) -> None:
    response = await client.post(url, content=body(tensor()))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()
