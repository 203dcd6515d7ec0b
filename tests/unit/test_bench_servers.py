"""bench/model.py, bench/ceiling.py, bench/naive.py: the stand-in model and both comparison
servers answer like onnxruntime, checked in process against a numpy forward pass."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bench import ceiling, naive, workloads
from bench.model import payload_row, session, standin_mlp_bytes, v2_body
from kdgate.service.cards import load_card, verify_model_file


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "standin.onnx"
    path.write_bytes(standin_mlp_bytes((64,), seed=0))
    return path


def _numpy_forward(path: Path, rows: np.ndarray) -> np.ndarray:
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    hidden = np.maximum(rows / 16 @ weights["w0"] + weights["b0"], 0)
    return np.asarray(hidden @ weights["w1"] + weights["b1"])


def test_standin_has_the_digits_signature_and_computes_an_mlp(standin: Path) -> None:
    sess = session(standin)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", 64)
    assert (out.name, out.shape[1]) == ("logits", 10)
    rows = np.random.default_rng(3).uniform(0, 16, (5, 64)).astype(np.float32)
    np.testing.assert_allclose(
        sess.run(None, {"input": rows})[0], _numpy_forward(standin, rows), rtol=1e-5, atol=1e-5
    )


def test_payload_is_a_v2_request_for_one_digits_row() -> None:
    row = payload_row()
    assert row.shape == (64,)
    assert row.min() >= 0 and row.max() <= 16
    (tensor,) = json.loads(v2_body(row))["inputs"]
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == ("input", [1, 64], "FP32")
    np.testing.assert_array_equal(np.asarray(tensor["data"], np.float32), row)


def _batch_body(rows: np.ndarray) -> dict[str, object]:
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32"}
    return {"id": "req-7", "inputs": [{**tensor, "data": rows.ravel().tolist()}]}


def _calls(app: Any, *requests: tuple[str, str, Any]) -> list[httpx.Response]:
    """Send (method, path, json-or-bytes) requests to an ASGI app in process, in order."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [
                await client.request(
                    method,
                    path,
                    **({"content": body} if isinstance(body, bytes) else {"json": body}),
                )
                for method, path, body in requests
            ]

    return asyncio.run(go())


def test_ceiling_answers_v2_like_numpy(standin: Path) -> None:
    rows = np.random.default_rng(4).uniform(0, 16, (3, 64)).astype(np.float32)
    answer, ready, bad = _calls(
        ceiling.build_app(standin, "digits"),
        ("POST", "/v2/models/digits/infer", _batch_body(rows)),
        ("GET", "/v2/health/ready", None),
        ("POST", "/v2/models/digits/infer", b"{not json"),
    )
    assert answer.status_code == 200
    body = answer.json()
    assert (body["model_name"], body["id"]) == ("digits", "req-7")
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [3, 10])
    np.testing.assert_allclose(
        np.reshape(output["data"], (3, 10)), _numpy_forward(standin, rows), rtol=1e-5, atol=1e-5
    )
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert bad.status_code == 400


def test_naive_answers_v2_like_numpy(standin: Path) -> None:
    rows = np.random.default_rng(5).uniform(0, 16, (2, 64)).astype(np.float32)
    answer, unknown, ready = _calls(
        naive.build_app(standin, "digits"),
        ("POST", "/v2/models/digits/infer", _batch_body(rows)),
        ("POST", "/v2/models/other/infer", _batch_body(rows)),
        ("GET", "/v2/health/ready", None),
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["id"] == "req-7"
    np.testing.assert_allclose(
        np.reshape(body["outputs"][0]["data"], (2, 10)),
        _numpy_forward(standin, rows),
        rtol=1e-5,
        atol=1e-5,
    )
    assert unknown.status_code == 404
    assert ready.status_code == 200


def _text_forward(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The text model of bench/workloads.py in numpy: embed, token MLP, masked mean, linear."""
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    tokens = w["embedding"][feed["input_ids"]]
    hidden = np.maximum(tokens @ w["w1"] + w["b1"], 0) @ w["w2"]
    mask = feed["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / (mask.sum(axis=1) + 1e-6)
    return np.asarray(pooled @ w["wc"] + w["bc"])


@pytest.mark.parametrize("workload", ["text-b1", "text-b32"])
def test_the_text_workload_is_served_by_the_ceiling_like_numpy(
    workload: workloads.WorkloadName, tmp_path: Path
) -> None:
    work = workloads.build(workload, tmp_path)
    rows = 32 if workload == "text-b32" else 1
    feed = workloads.text_feed(rows)
    assert feed["input_ids"].shape == feed["attention_mask"].shape == (rows, 64)
    # The card verifies against the file it names, as kdgate checks before serving it.
    verify_model_file(work.student.card, load_card(work.student.card))
    want = _text_forward(work.student.onnx, feed)
    np.testing.assert_allclose(work.expected, want, rtol=1e-4, atol=1e-5)
    (answer,) = _calls(
        ceiling.build_app(work.student.onnx, "text"), ("POST", work.infer_path, work.body)
    )
    assert answer.status_code == 200
    (output,) = answer.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], (rows, 4)), want, rtol=1e-4, atol=1e-5)
