import asyncio
import contextvars
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kdgate.monitoring.deadline import DeadlineTransport, total_deadline
from kdgate.monitoring.teacher import (
    LocalOnnxTeacher,
    RemoteOipTeacher,
    TeacherError,
    checked_scores,
    v2_json_tensor,
)
from tests.support.text_pair import reference_scores, text_model, text_weights, token_batch
from tests.support.trickling_teacher import TricklingTeacher

RNG = np.random.default_rng(0)
W = RNG.normal(size=(64, 10)).astype(np.float32)
B = RNG.normal(size=10).astype(np.float32)


def linear_onnx(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """An ONNX model `logits = input @ weights + bias` with the kdgate signature."""
    d, c = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, c])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_local_teacher_runs_the_model_off_the_loop() -> None:
    x = RNG.uniform(0, 16, size=(33, 64)).astype(np.float32)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        teacher = LocalOnnxTeacher(linear_onnx(W, B), name="digits-teacher", version="3")
        try:
            return await teacher.infer({"input": x}), await teacher.infer({"input": x[:1]})
        finally:
            await teacher.aclose()

    batch, single = asyncio.run(main())
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch, x.astype(np.float64) @ W + B, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(single, batch[:1], rtol=1e-6)


def test_a_slow_local_run_does_not_block_the_event_loop() -> None:
    loop_thread: list[int] = []
    run_threads: list[int] = []

    class SlowSession:
        def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            run_threads.append(threading.get_ident())
            time.sleep(0.2)
            return [np.zeros((len(feed["input"]), 10), np.float32)]

    async def main() -> int:
        loop_thread.append(threading.get_ident())
        teacher = LocalOnnxTeacher(linear_onnx(W, B), name="t", version="1")
        teacher._session = SlowSession()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await teacher.infer({"input": np.zeros((2, 64), np.float32)})
        task.cancel()
        await teacher.aclose()
        return ticks

    ticks = asyncio.run(main())
    assert run_threads and run_threads[0] != loop_thread[0]
    assert ticks >= 10  # ~20 expected: the loop kept running during the 200 ms teacher call


def test_local_teacher_wraps_runtime_errors() -> None:
    async def main() -> None:
        teacher = LocalOnnxTeacher(linear_onnx(W, B), name="t", version="1")
        try:
            await teacher.infer({"input": np.zeros((2, 63), np.float32)})
        finally:
            await teacher.aclose()

    with pytest.raises(TeacherError, match="failed"):
        asyncio.run(main())


def test_local_teacher_gets_every_input_by_name_through_the_input_map() -> None:
    """A two-input INT64 teacher that calls its inputs `ids`/`mask`: the student's `input_ids`
    and `attention_mask` reach it through the map, and its scores output is the one asked for."""
    weights = text_weights(1, classes=4)
    model = text_model(weights, ids_name="ids", mask_name="mask", output_name="scores")
    ids, mask = token_batch(np.random.default_rng(5), 9)

    async def main() -> np.ndarray:
        teacher = LocalOnnxTeacher(
            model.SerializeToString(),
            name="text-teacher",
            version="1",
            output_name="scores",
            input_map={"input_ids": "ids", "attention_mask": "mask"},
        )
        try:
            return await teacher.infer({"input_ids": ids, "attention_mask": mask})
        finally:
            await teacher.aclose()

    scores = asyncio.run(main())
    np.testing.assert_allclose(scores, reference_scores(weights, ids, mask), rtol=1e-5, atol=1e-5)


def test_local_teacher_without_a_mapping_misses_the_inputs_it_calls_otherwise() -> None:
    model = text_model(text_weights(1, classes=4), ids_name="ids", mask_name="mask")
    ids, mask = token_batch(np.random.default_rng(5), 2)

    async def main() -> None:
        teacher = LocalOnnxTeacher(model.SerializeToString(), name="t", version="1")
        try:
            await teacher.infer({"input_ids": ids, "attention_mask": mask})
        finally:
            await teacher.aclose()

    with pytest.raises(TeacherError, match="failed"):
        asyncio.run(main())


def test_remote_teacher_sends_every_input_with_its_datatype_and_reads_the_named_output() -> None:
    seen: list[dict[str, Any]] = []
    weights = text_weights(2, classes=3)
    ids, mask = token_batch(np.random.default_rng(6), 4)

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        tensors = {t["name"]: t for t in body["inputs"]}
        got_ids = np.asarray(tensors["ids"]["data"], np.int64).reshape(tensors["ids"]["shape"])
        got_mask = np.asarray(tensors["attention_mask"]["data"], np.int64).reshape(
            tensors["attention_mask"]["shape"]
        )
        probs = np.exp(reference_scores(weights, got_ids, got_mask))
        probs /= probs.sum(axis=1, keepdims=True)
        outputs = [
            {"name": "label", "shape": [len(probs)], "datatype": "INT64", "data": [0] * len(probs)},
            {
                "name": "probabilities",
                "shape": list(probs.shape),
                "datatype": "FP32",
                "data": probs.ravel().tolist(),
            },
        ]
        return httpx.Response(200, json={"outputs": outputs})

    async def main() -> np.ndarray:
        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            teacher = RemoteOipTeacher(
                client,
                url="http://t",
                model="text-teacher",
                output_name="probabilities",
                input_datatypes={"input_ids": "INT64", "attention_mask": "INT64"},
                input_map={"input_ids": "ids"},
            )
            try:
                return await teacher.infer({"input_ids": ids, "attention_mask": mask})
            finally:
                await teacher.aclose()

    probs = asyncio.run(main())
    expected = np.exp(reference_scores(weights, ids, mask))
    np.testing.assert_allclose(probs, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)
    (body,) = seen
    assert [(t["name"], t["datatype"], t["shape"]) for t in body["inputs"]] == [
        ("ids", "INT64", [4, 6]),
        ("attention_mask", "INT64", [4, 6]),
    ]
    assert body["outputs"] == [{"name": "probabilities"}]


def test_v2_json_tensors_of_other_datatypes() -> None:
    half = v2_json_tensor("x", "FP16", np.array([[0.5, 1.5]], np.float16))
    assert half["data"].dtype == np.float32 and half["shape"] == [1, 2]
    text = v2_json_tensor("s", "BYTES", np.array([[b"hi", b"there"]], dtype=object))
    assert text == {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": ["hi", "there"]}


def _oip_server(requests: list[dict[str, Any]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(
            {"url": str(request.url), "body": body, "content_type": request.headers["content-type"]}
        )
        (tensor,) = body["inputs"]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        logits = x.astype(np.float64) @ W + B
        return httpx.Response(
            200,
            json={
                "model_name": "digits-teacher",
                "outputs": [
                    {"name": "other", "shape": [1], "datatype": "FP32", "data": [0.0]},
                    {
                        "name": "logits",
                        "shape": list(logits.shape),
                        "datatype": "FP32",
                        "data": logits.ravel().tolist(),
                    },
                ],
            },
        )

    return httpx.MockTransport(handler)


CALLER = contextvars.ContextVar("caller", default="none")


def test_remote_teacher_calls_from_its_own_thread_in_the_callers_context() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((threading.current_thread().name, CALLER.get()))
        return httpx.Response(
            200, json={"outputs": [{"name": "logits", "shape": [1, 2], "data": [0.5, 1.5]}]}
        )

    async def main() -> str:
        CALLER.set("shadow-worker")
        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            teacher = RemoteOipTeacher(client, url="http://t", model="digits-teacher")
            try:
                await teacher.infer({"input": np.zeros((1, 4), np.float32)})
            finally:
                await teacher.aclose()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    ((thread, caller),) = seen
    assert thread.startswith("teacher-digits-teacher") and thread != loop_thread
    assert caller == "shadow-worker"


def test_remote_teacher_speaks_oip_v2_json() -> None:
    seen: list[dict[str, Any]] = []
    x = RNG.uniform(0, 16, size=(5, 64)).astype(np.float32)

    async def main() -> np.ndarray:
        with httpx.Client(transport=_oip_server(seen)) as client:
            teacher = RemoteOipTeacher(
                client, url="http://teacher:8001/", model="digits-teacher", model_version="2"
            )
            return await teacher.infer({"input": x})

    logits = asyncio.run(main())
    np.testing.assert_allclose(logits, x.astype(np.float64) @ W + B, rtol=1e-5, atol=1e-4)
    (request,) = seen
    assert request["url"] == "http://teacher:8001/v2/models/digits-teacher/versions/2/infer"
    assert request["content_type"] == "application/json"
    tensor = request["body"]["inputs"][0]
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == ("input", [5, 64], "FP32")
    assert request["body"]["outputs"] == [{"name": "logits"}]


@pytest.mark.parametrize(
    ("response", "match"),
    [
        (httpx.Response(500, json={"error": "boom"}), "answered 500"),
        (httpx.Response(200, content=b"not json"), "no usable output"),
        (
            httpx.Response(
                200, json={"outputs": [{"name": "probs", "shape": [1, 2], "data": [1, 2]}]}
            ),
            "no usable output",
        ),
        (
            httpx.Response(
                200, json={"outputs": [{"name": "logits", "shape": [3, 2], "data": [0] * 6}]}
            ),
            "shape",
        ),
        (
            httpx.Response(
                200, json={"outputs": [{"name": "logits", "shape": [2, 3], "data": [0] * 5}]}
            ),
            "no usable output",
        ),
    ],
)
def test_remote_teacher_failures_are_teacher_errors(response: httpx.Response, match: str) -> None:
    async def main() -> None:
        with httpx.Client(transport=httpx.MockTransport(lambda _: response)) as client:
            await RemoteOipTeacher(client, url="http://t", model="m").infer(
                {"input": np.zeros((2, 4), np.float32)}
            )

    with pytest.raises(TeacherError, match=match):
        asyncio.run(main())


def test_remote_teacher_transport_errors_and_timeout_are_teacher_errors() -> None:
    timeouts: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        raise httpx.ReadTimeout("slow", request=request)

    async def main() -> None:
        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            await RemoteOipTeacher(client, url="http://t", model="m", timeout_seconds=0.25).infer(
                {"input": np.zeros((1, 4), np.float32)}
            )

    with pytest.raises(TeacherError, match="ReadTimeout"):
        asyncio.run(main())
    assert timeouts[0]["read"] == 0.25


def test_checked_scores_rejects_non_finite() -> None:
    with pytest.raises(TeacherError, match="non-finite"):
        checked_scores(np.array([[np.nan, 0.0]]), 1)


# -- a remote teacher that trickles its answer: a real server on 127.0.0.1 ---------------------


@pytest.fixture
def trickling() -> Iterator[TricklingTeacher]:
    with TricklingTeacher() as server:
        yield server


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_a_trickling_teacher_is_cut_at_the_total_deadline_and_resumes_when_it_recovers(
    trickling: TricklingTeacher, mode: str
) -> None:
    batch = np.zeros((3, 4), np.float32)

    async def main() -> None:
        with httpx.Client(transport=DeadlineTransport()) as client:
            teacher = RemoteOipTeacher(client, url=trickling.url, model="m", timeout_seconds=0.6)
            try:
                assert (await teacher.infer({"input": batch})).shape == (3, 2)
                trickling.mode = mode
                started = time.monotonic()
                with pytest.raises(TeacherError, match="Timeout"):
                    # Each byte comes well within the 0.6 s per-read timeout: only a total
                    # deadline ends this call. The outer bound keeps a regression from hanging.
                    await asyncio.wait_for(teacher.infer({"input": batch}), 10)
                assert 0.5 < time.monotonic() - started < 1.5
                trickling.mode = "ok"  # the teacher recovers: the very next call goes through
                started = time.monotonic()
                assert (await asyncio.wait_for(teacher.infer({"input": batch}), 10)).shape == (3, 2)
                assert time.monotonic() - started < 1.0
            finally:
                await teacher.aclose()

    asyncio.run(main())


def test_closing_a_teacher_during_an_endless_trickle_takes_at_most_one_timeout(
    trickling: TricklingTeacher,
) -> None:
    trickling.mode = "body"

    async def main() -> float:
        with httpx.Client(transport=DeadlineTransport()) as client:
            teacher = RemoteOipTeacher(client, url=trickling.url, model="m", timeout_seconds=0.8)
            call = asyncio.ensure_future(teacher.infer({"input": np.zeros((1, 4), np.float32)}))
            await asyncio.sleep(0.2)  # the call is in the middle of the trickle
            started = time.monotonic()
            await asyncio.wait_for(teacher.aclose(), 10)
            closed = time.monotonic() - started
            with pytest.raises(TeacherError):
                await call
            return closed

    assert asyncio.run(main()) < 1.5  # the call ends at its deadline, 0.6 s after the close


def test_the_deadline_transport_is_httpx_without_a_deadline(trickling: TricklingTeacher) -> None:
    with httpx.Client(transport=DeadlineTransport()) as client:
        body = {"inputs": [{"shape": [2, 4]}]}
        answer = client.post(trickling.url + "/v2/models/m/infer", json=body)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [2, 2]
        trickling.mode = "headers"
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout), total_deadline(0.3):
            client.post(trickling.url + "/v2/models/m/infer", json=body, timeout=5)
        assert time.monotonic() - started < 1.0
