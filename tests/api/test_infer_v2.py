"""V2 infer through the app in process: JSON (flat, nested, batch), binary both ways, ids."""

from __future__ import annotations

import time

import anyio
import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.request_log import SECONDS
from tests.support.tiny_model import reference_logits
from tests.support.v2 import binary_request, json_request, read_binary_response

pytestmark = pytest.mark.anyio

URL = "/v2/models/digits/infer"


def digits(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (batch, 64)).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 32])
async def test_json_matches_the_numpy_reference(client: httpx.AsyncClient, batch: int) -> None:
    x = digits(batch)
    response = await client.post(URL, json=json_request(x))
    assert response.status_code == 200, response.text
    body = response.json()
    (output,) = body["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32"
    assert output["shape"] == [batch, 10]
    got = np.asarray(output["data"], np.float32).reshape(batch, 10)
    np.testing.assert_allclose(got, reference_logits(x), atol=1e-5)
    assert body["model_name"] == "digits" and body["model_version"] == "1"
    assert response.headers["x-kdgate-model-version"] == "1"


async def test_nested_data_equals_flat_data(client: httpx.AsyncClient) -> None:
    x = digits(3)
    request = json_request(x)
    request["inputs"][0]["data"] = x.tolist()
    nested = (await client.post(URL, json=request)).json()
    flat = (await client.post(URL, json=json_request(x))).json()
    assert nested["outputs"] == flat["outputs"]


async def test_integer_data_is_accepted_for_fp32(client: httpx.AsyncClient) -> None:
    x = np.arange(64, dtype=np.float32).reshape(1, 64) % 17
    request = json_request(x)
    request["inputs"][0]["data"] = [int(v) for v in x.ravel()]
    response = await client.post(URL, json=request)
    got = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, reference_logits(x), atol=1e-5)


async def test_client_id_is_echoed_in_body_and_header(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=json_request(digits(1), id="req-42"))
    assert response.json()["id"] == "req-42"
    assert response.headers["x-request-id"] == "req-42"


async def test_missing_id_is_generated_uuid4_hex(client: httpx.AsyncClient) -> None:
    import uuid

    first = await client.post(URL, json=json_request(digits(1)))
    second = await client.post(URL, json=json_request(digits(1)))
    ids = [r.json()["id"] for r in (first, second)]
    assert ids[0] != ids[1]
    for rid, response in zip(ids, (first, second), strict=True):
        assert uuid.UUID(hex=rid).version == 4 and uuid.UUID(hex=rid).hex == rid
        assert response.headers["x-request-id"] == rid


async def test_x_request_id_header_is_used_when_body_has_no_id(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=json_request(digits(1)), headers={"x-request-id": "h-1"})
    assert response.json()["id"] == "h-1"


async def test_without_content_type_header(client: httpx.AsyncClient) -> None:
    import orjson

    request = client.build_request("POST", URL, content=orjson.dumps(json_request(digits(1))))
    assert "content-type" not in request.headers  # httpx sends none for raw content
    response = await client.send(request)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("batch", [1, 32])
async def test_binary_in_binary_out(client: httpx.AsyncClient, batch: int) -> None:
    x = digits(batch)
    body, json_length = binary_request(x, binary_output=True, id="b1")
    response = await client.post(
        URL, content=body, headers={"Inference-Header-Content-Length": str(json_length)}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, arrays = read_binary_response(
        response.content, int(response.headers["inference-header-content-length"])
    )
    assert header["id"] == "b1"
    assert header["outputs"][0]["shape"] == [batch, 10]
    np.testing.assert_allclose(arrays["logits"], reference_logits(x), atol=1e-5)


async def test_binary_in_json_out(client: httpx.AsyncClient) -> None:
    x = digits(2)
    body, json_length = binary_request(x, binary_output=False)
    response = await client.post(
        URL, content=body, headers={"inference-header-content-length": str(json_length)}
    )
    assert "inference-header-content-length" not in response.headers
    data = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(data, reference_logits(x), atol=1e-5)


async def test_output_selection_with_binary_flag(client: httpx.AsyncClient) -> None:
    x = digits(1)
    request = json_request(x, outputs=[{"name": "logits", "parameters": {"binary_data": True}}])
    response = await client.post(URL, json=request)
    _, arrays = read_binary_response(
        response.content, int(response.headers["inference-header-content-length"])
    )
    np.testing.assert_allclose(arrays["logits"], reference_logits(x), atol=1e-5)


async def test_explicit_version_url(client: httpx.AsyncClient) -> None:
    response = await client.post("/v2/models/digits/versions/1/infer", json=json_request(digits(1)))
    assert response.status_code == 200
    assert response.headers["x-kdgate-model-version"] == "1"


async def test_requests_are_counted_and_timed(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    labels = {"model": "digits", "version": "1", "protocol": "v2", "code": "200"}
    before = registry.get_sample_value("kdgate_requests_total", labels) or 0.0
    for _ in range(3):
        await client.post(URL, json=json_request(digits(1)))
    await client.post(URL, content=b"{")
    assert registry.get_sample_value("kdgate_requests_total", labels) == before + 3
    bad = {**labels, "code": "400"}
    assert registry.get_sample_value("kdgate_requests_total", bad) == 1
    count = registry.get_sample_value(
        "kdgate_request_duration_seconds_count", {"model": "digits", "version": "1"}
    )
    assert count == before + 4
    metrics = await client.get("/metrics")
    assert 'kdgate_requests_total{code="200",model="digits",protocol="v2",version="1"}' in (
        metrics.text
    )


async def test_bookkeeping_is_logged_and_settled_before_a_read(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    log = client._transport.app.state.request_log  # type: ignore[attr-defined]
    labels = {"model": "digits", "version": "1", "protocol": "v2", "code": "200"}
    before = registry.get_sample_value("kdgate_requests_total", labels) or 0.0
    assert len(log) == 0
    assert (await client.post(URL, json=json_request(digits(1)))).status_code == 200
    assert len(log) == 1  # answered, not yet settled
    assert registry.get_sample_value("kdgate_requests_total", labels) == before + 1
    assert len(log) == 0  # the read settled it first


async def test_the_log_settles_on_its_own_within_its_delay(client: httpx.AsyncClient) -> None:
    log = client._transport.app.state.request_log  # type: ignore[attr-defined]
    assert (await client.post(URL, json=json_request(digits(1)))).status_code == 200
    deadline = time.monotonic() + 2.0
    for _ in range(1000):  # polled: no read of the results may settle it
        if not len(log) or time.monotonic() > deadline:
            break
        await anyio.sleep(SECONDS / 4)
    assert len(log) == 0
