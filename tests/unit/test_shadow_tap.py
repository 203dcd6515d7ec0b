"""ModelShadow (service/shadow_tap.py): deterministic sampling, non-blocking drops, feedback
kept."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recorder import FidelityRecorder
from kdgate.monitoring.shadow import ShadowQueue
from kdgate.service.shadow_tap import ModelShadow


def hook(fraction: float, capacity_rows: int = 100) -> tuple[ModelShadow, ShadowQueue, Metrics]:
    metrics = Metrics(CollectorRegistry())
    feedback = FeedbackStore(FidelityRecorder(metrics, "m"), max_size=1000)
    queue = ShadowQueue(metrics, "m", capacity_rows=capacity_rows)
    shadow = ModelShadow(feedback, queue, shadow_fraction=lambda: fraction, scores_name="y")
    return shadow, queue, metrics


def arrays(rows: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return {"x": np.ones((rows, 4), np.float32)}, {"y": np.zeros((rows, 3), np.float32)}


@pytest.mark.anyio
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
async def test_shadows_exactly_the_ids_the_crc_picks(fraction: float) -> None:
    shadow, queue, _ = hook(fraction, capacity_rows=10_000)
    ids = [f"id-{i}" for i in range(2000)]
    for request_id in ids:
        shadow.observe(request_id, "1", *arrays(1))
    picked = [s.request_id for s in queue.take(10_000)]
    assert picked == [i for i in ids if zlib.crc32(i.encode()) < fraction * 2**32]
    assert len(shadow.feedback) == 1000  # every prediction is kept, up to max_size


@pytest.mark.anyio
async def test_full_queue_drops_and_counts_rows_without_blocking() -> None:
    shadow, queue, metrics = hook(1.0, capacity_rows=5)
    for i in range(4):
        shadow.observe(f"r{i}", "1", *arrays(2))
    assert queue.rows == 4  # two requests of two rows fit, the others did not
    dropped = metrics.registry.get_sample_value(
        "kdgate_shadow_total", {"model": "m", "outcome": "dropped"}
    )
    assert dropped == 4
    answer = shadow.feedback.apply_feedback([{"id": "r3", "label": [0, 1]}])
    assert answer["accepted"] == 1  # a dropped request is still labelled for the student


@pytest.mark.anyio
async def test_a_broken_hook_never_raises_into_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shadow, _, _ = hook(1.0)
    shadow.observe("r", "1", {"x": np.ones((1, 4), np.float32)}, {"other": np.zeros((1, 3))})
    assert "shadow/feedback hook failed" in caplog.text


@pytest.mark.anyio
async def test_every_input_of_a_request_is_shadowed_by_name() -> None:
    shadow, queue, _ = hook(1.0)
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    mask = np.ones((2, 6), np.int64)
    scores = np.zeros((2, 3), np.float32)
    shadow.observe("r", "1", {"input_ids": ids, "attention_mask": mask}, {"y": scores, "z": ids})
    (sample,) = queue.take(10)
    assert sorted(sample.inputs) == ["attention_mask", "input_ids"]
    assert sample.inputs["input_ids"] is ids and sample.inputs["attention_mask"] is mask
    assert sample.student_scores is scores and sample.rows == 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
