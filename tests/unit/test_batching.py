"""service/batching.py: which signatures batch, and that a batch answers as separate runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.metrics import Metrics
from kdgate.service.batching import Batcher, batchable
from kdgate.service.cards import TensorSpec
from kdgate.service.routing import Variant
from kdgate.service.runtime import StudentSession
from kdgate.service.tensors import Signature
from tests.support.tiny_model import write_tiny_student

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CountingSession:
    """A real student session that counts its runs and the rows of each."""

    def __init__(self, session: StudentSession) -> None:
        self.session = session
        self.runs: list[int] = []

    def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.runs.append(len(inputs["input"]))
        return self.session.run(inputs)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> StudentSession:
    return StudentSession.from_card(write_tiny_student(Path(tmp_path_factory.mktemp("b"))))


def rows(count: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    data = np.random.default_rng(seed).uniform(0, 16, size=(count, 64)).astype(np.float32)
    return {"input": data}


def spec(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name=name, datatype="FP32", shape=list(shape))


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ([spec("x", -1, 64)], [spec("y", -1, 10)], True),
        ([spec("x", -1, 8, 8)], [spec("y", -1, 10), spec("p", -1, 10)], True),
        ([spec("x", 1, 64)], [spec("y", -1, 10)], False),  # fixed batch size
        ([spec("x", -1, -1)], [spec("y", -1, 10)], False),  # rows of different widths
        ([spec("x", -1, 64)], [spec("y", 10)], False),  # an output without a batch dimension
        ([spec("x", -1, 64), spec("z", -1, 2)], [spec("y", -1, 10)], False),  # two inputs
    ],
)
def test_batchable(inputs: list[TensorSpec], outputs: list[TensorSpec], expected: bool) -> None:
    signature = Signature({t.name: t for t in inputs}, {t.name: t for t in outputs})
    assert batchable(signature) is expected


async def test_requests_of_one_loop_iteration_share_one_run(student: StudentSession) -> None:
    counting = CountingSession(student)
    batcher = Batcher(counting, max_rows=32)
    assert not batcher.busy()  # nothing ran yet: a request would run inline
    assert batcher.inline()
    assert batcher.busy()
    assert not batcher.inline()  # the iteration's later requests join the batch
    requests = [rows(n, seed) for seed, n in enumerate([1, 3, 1, 2, 5])]
    answers = await asyncio.gather(*(batcher.run(r) for r in requests))
    assert counting.runs == [12]  # one run over every row
    for request, answer in zip(requests, answers, strict=True):
        alone = student.run(request)
        assert answer.keys() == alone.keys()
        assert answer["logits"].shape == alone["logits"].shape
        np.testing.assert_allclose(answer["logits"], alone["logits"], rtol=1e-5, atol=1e-5)


async def test_after_a_shared_run_the_first_request_joins_until_a_batch_has_no_company(
    student: StudentSession,
) -> None:
    counting = CountingSession(student)
    batcher = Batcher(counting, max_rows=32)
    assert batcher.inline()  # a quiet server: the first request runs inline
    await asyncio.gather(batcher.run(rows(1, 1)), batcher.run(rows(1, 2)))
    await asyncio.sleep(0)  # the next loop iteration
    # Requests came together: the next iteration's first joins a batch instead of running alone.
    assert batcher.busy() and not batcher.inline()
    await asyncio.gather(*(batcher.run(rows(1, seed)) for seed in range(3)))
    assert counting.runs == [2, 3]
    assert not batcher.inline()  # still busy: that batch had three requests
    await batcher.run(rows(2, 4))  # a batch of one request: the load went down
    assert counting.runs == [2, 3, 2]
    await asyncio.sleep(0)
    assert not batcher.busy() and batcher.inline()  # lone requests run inline again
    await asyncio.sleep(0)
    assert batcher.inline()
    assert counting.runs == [2, 3, 2]  # inline runs are the caller's, not the batcher's


async def test_a_batch_never_takes_more_than_max_rows(student: StudentSession) -> None:
    counting = CountingSession(student)
    batcher = Batcher(counting, max_rows=4)
    assert batcher.inline()
    requests = [rows(n, seed) for seed, n in enumerate([2, 2, 3, 1, 4])]
    answers = await asyncio.gather(*(batcher.run(r) for r in requests))
    assert counting.runs == [4, 4, 4]
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(
            answer["logits"], student.run(request)["logits"], rtol=1e-5, atol=1e-5
        )


async def test_a_failed_run_fails_each_request_of_its_batch() -> None:
    class Broken:
        def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
            raise RuntimeError("session lost")

    batcher = Batcher(Broken(), max_rows=32)
    assert batcher.inline()
    answers = await asyncio.gather(
        *(batcher.run(rows(1, seed)) for seed in range(3)), return_exceptions=True
    )
    assert [str(a) for a in answers] == ["session lost"] * 3


async def test_outputs_without_a_row_per_input_row_are_run_request_by_request() -> None:
    class Pooling:
        """Answers one row whatever it is given: not a per-row model."""

        def __init__(self) -> None:
            self.runs = 0

        def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
            self.runs += 1
            return {"mean": inputs["input"].mean(axis=0, keepdims=True)}

    session = Pooling()
    batcher = Batcher(session, max_rows=32)
    assert batcher.inline()
    requests = [rows(2, seed) for seed in range(3)]
    answers = await asyncio.gather(*(batcher.run(r) for r in requests))
    assert session.runs == 1 + 3  # the refused batch, then each alone
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(answer["mean"], request["input"].mean(axis=0, keepdims=True))


async def test_a_lone_request_in_batch_mode_runs_by_itself(student: StudentSession) -> None:
    counting = CountingSession(student)
    batcher = Batcher(counting, max_rows=32)
    assert batcher.inline()
    answer = await batcher.run(rows(2, 7))
    assert counting.runs == [2]
    np.testing.assert_allclose(answer["logits"], student.run(rows(2, 7))["logits"], atol=1e-6)


def test_max_rows_below_two_is_refused(student: StudentSession) -> None:
    with pytest.raises(ValueError, match="max_rows"):
        Batcher(student, max_rows=1)


async def test_each_batch_reports_its_rows_and_first_wait_once(student: StudentSession) -> None:
    registry = CollectorRegistry()
    variant = Variant("digits", student, "1", batch_max_rows=32, metrics=Metrics(registry))
    assert variant.batcher is not None
    loop = asyncio.get_running_loop()
    tasks = [
        asyncio.ensure_future(variant.batcher.run(rows(n, s))) for s, n in enumerate([1, 3, 2])
    ]
    # Queued after the three requests' first steps, so before the flush the first one schedules:
    # the batch's first request waits at least this long.
    loop.call_soon(time.sleep, 0.03)
    await asyncio.gather(*tasks)
    await variant.batcher.run(rows(4, 9))  # a second batch, of one request

    labels = {"model": "digits", "version": "1"}
    value = registry.get_sample_value
    assert value("kdgate_batch_rows_count", labels) == 2
    assert value("kdgate_batch_rows_sum", labels) == 6 + 4
    assert value("kdgate_batch_rows_bucket", {**labels, "le": "4.0"}) == 1
    assert value("kdgate_batch_rows_bucket", {**labels, "le": "8.0"}) == 2
    assert value("kdgate_batch_wait_seconds_count", labels) == 2
    waited = value("kdgate_batch_wait_seconds_sum", labels)
    assert waited is not None and 0.03 <= waited < 1.0


async def test_a_failing_observer_fails_no_request(
    student: StudentSession, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: float) -> None:
        raise RuntimeError("observer down")

    batcher = Batcher(student, max_rows=32, observe_rows=broken)
    answers = await asyncio.gather(*(batcher.run(rows(2, seed)) for seed in range(3)))
    assert [len(a["logits"]) for a in answers] == [2, 2, 2]
    assert "batch observer failed" in caplog.text
