"""Hypothesis against every path of the OpenAPI schema: no input makes the server answer 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.settings import load_settings
from tests.support.asgi import SyncClient
from tests.support.tiny_model import write_config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=70) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=80,
)
names = st.sampled_from(["digits", "cats", "1", ""]) | st.from_regex(
    r"[A-Za-z0-9._~:@!$&'()*+,;=-]{1,6}", fullmatch=True
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncClient]:
    config = write_config(tmp_path_factory.mktemp("fuzz"), max_body_bytes=16 * 1024)
    app = create_app(load_settings(config), registry=CollectorRegistry())
    with SyncClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def operations(client: SyncClient) -> list[tuple[str, str]]:
    schema = client.get("/openapi.json").json()
    return [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops]


def valid_request() -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}


def mutate(request: dict[str, Any], where: list[str | int], value: Any) -> dict[str, Any]:
    target: Any = request
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return request


PLACES: list[list[str | int]] = [
    ["inputs"], ["inputs", 0], ["inputs", 0, "name"], ["inputs", 0, "shape"],
    ["inputs", 0, "datatype"], ["inputs", 0, "data"], ["inputs", 0, "parameters"],
    ["outputs"], ["parameters"], ["id"], ["inputs", 0, "shape", 0], ["inputs", 0, "data", 3],
]  # fmt: skip


def check(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), body=json_values, model=names, version=names)
def test_any_operation_any_json(
    client: SyncClient,
    operations: list[tuple[str, str]],
    data: st.DataObject,
    body: Any,
    model: str,
    version: str,
) -> None:
    method, template = data.draw(st.sampled_from(operations))
    path = template.replace("{model}", model).replace("{version}", version)
    content = json.dumps(body).encode() if method == "POST" else None
    check(client.request(method, path, content=content))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(place=st.sampled_from(PLACES), value=json_values, v1=st.booleans())
def test_mutated_valid_requests(
    client: SyncClient, place: list[str | int], value: Any, v1: bool
) -> None:
    if v1:
        instances = [[0] * 64, [0] * 64]
        if len(place) > 1:
            instances[0] = value
        response = client.post(
            "/v1/models/digits:predict", content=json.dumps({"instances": instances})
        )
    else:
        request = mutate(valid_request(), place, value)
        response = client.post("/v2/models/digits/infer", content=json.dumps(request))
    check(response)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    size=st.integers(-1, 600),
    declared=st.one_of(
        st.none(), st.integers(-5, 2000), st.from_regex(r"[ -~]{0,4}", fullmatch=True)
    ),
    tail=st.binary(max_size=600),
)
def test_binary_extension_garbage(
    client: SyncClient, size: int, declared: int | str | None, tail: bytes
) -> None:
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                     "parameters": {"binary_data_size": size}}]}
    ).encode()  # fmt: skip
    headers = {} if declared is None else {"inference-header-content-length": str(declared)}
    check(client.post("/v2/models/digits/infer", content=header + tail, headers=headers))


def test_fuzz_config_is_real(tmp_path: Path) -> None:
    """Guard: the fuzzed app serves a valid request (so 4xx answers are not all 503s)."""
    config = write_config(tmp_path)
    app = create_app(load_settings(config), registry=CollectorRegistry())
    with SyncClient(app) as client:
        assert client.post("/v2/models/digits/infer", json=valid_request()).status_code == 200
