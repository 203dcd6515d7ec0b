"""Feedback and fidelity endpoints in process, with the committed digits pair and local teacher."""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sklearn.datasets import load_digits

from kdgate.service.app import create_app
from kdgate.service.settings import AdminSettings, Settings
from tests.support.asgi import running
from tests.support.fidelity_reference import DIGITS, brute_force_ece, onnx_logits

pytestmark = pytest.mark.anyio


def digits_settings(fraction: float, **feedback: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"warmup_runs": 1},
            "models": [
                {
                    "name": "digits",
                    "students": [{"version": "1", "card": DIGITS / "student-v1.card.json"}],
                    "teacher": {"card": DIGITS / "teacher.card.json"},
                    "traffic": {"shadow_fraction": fraction},
                }
            ],
            "feedback": feedback,
        }
    )


def v2(request_id: str, row: np.ndarray) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}],
    }


async def infer(client: httpx.AsyncClient, request_id: str, row: np.ndarray) -> None:
    r = await client.post("/v2/models/digits/infer", json=v2(request_id, row))
    assert r.status_code == 200, r.text


async def wait_compared(registry: CollectorRegistry, rows: int) -> None:
    for _ in range(600):
        compared = registry.get_sample_value(
            "kdgate_shadow_total", {"model": "digits", "outcome": "compared"}
        )
        if compared == rows:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{compared} rows compared, expected {rows}")


def label_figures(registry: CollectorRegistry, version: str) -> tuple[float, float, float]:
    """(samples, accuracy, ECE) against labels, from the exported counters."""

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value
            for family in registry.collect()
            for s in family.samples
            if s.name == name
            and s.labels.get("reference") == "label"
            and s.labels.get("version") == version
            and all(s.labels.get(k) == v for k, v in labels.items())
        )

    n = total("kdgate_calibration_samples_total")
    gap = sum(
        abs(
            total("kdgate_calibration_correct_total", bin=str(b))
            - total("kdgate_calibration_confidence_total", bin=str(b))
        )
        for b in range(15)
    )
    return n, total("kdgate_calibration_correct_total") / n, gap / n


async def test_labels_for_1000_requests_match_an_independent_computation() -> None:
    digits = load_digits()
    inputs = digits.data[:1000].astype(np.float32)
    labels = digits.target[:1000].astype(np.int64)
    ids = [f"req-{i}" for i in range(1000)]
    # Independently of kdgate: which ids a fraction of 0.5 shadows (CRC-32 of the id).
    shadowed = np.array([zlib.crc32(i.encode()) < 0.5 * 2**32 for i in ids])
    assert 300 < shadowed.sum() < 700

    registry = CollectorRegistry()
    app = create_app(digits_settings(0.5), registry=registry)
    async with running(app) as client:
        for request_id, row in zip(ids, inputs, strict=True):
            await infer(client, request_id, row)
        await wait_compared(registry, int(shadowed.sum()))
        items = [{"id": i, "label": int(y)} for i, y in zip(ids, labels, strict=True)]
        r = await client.post("/v2/models/digits/feedback", json=[*items, {"id": "x", "label": 1}])
        fidelity = (await client.get("/v1/fidelity")).json()["models"]["digits"]
    assert r.status_code == 200
    assert r.json() == {
        "accepted": 1000,
        "unknown": ["x"],
        "expired": [],
        "duplicate": [],
        "invalid": [],
    }

    def reference(model: str, rows: np.ndarray) -> tuple[float, float]:
        probs = np.exp(onnx_logits(DIGITS / model, inputs[rows]))
        probs /= probs.sum(axis=1, keepdims=True)
        accuracy = float(np.mean(probs.argmax(axis=1) == labels[rows]))
        return accuracy, brute_force_ece(probs, labels[rows])

    every = np.ones(1000, bool)
    n, accuracy, ece = label_figures(registry, "1")
    want_accuracy, want_ece = reference("student-v1.onnx", every)
    assert n == 1000
    assert accuracy == pytest.approx(want_accuracy, rel=1e-9)
    assert ece == pytest.approx(want_ece, rel=1e-6)
    assert fidelity["label_accuracy"] == pytest.approx(want_accuracy, rel=1e-9)
    assert fidelity["ece_label"] == pytest.approx(want_ece, rel=1e-6)

    # The teacher, against the same labels, only where the request was shadowed.
    n, accuracy, ece = label_figures(registry, "teacher")
    want_accuracy, want_ece = reference("teacher.onnx", shadowed)
    assert n == shadowed.sum()
    assert accuracy == pytest.approx(want_accuracy, rel=1e-9)
    assert ece == pytest.approx(want_ece, rel=1e-6)
    assert fidelity["teacher_label_samples"] == shadowed.sum()
    assert fidelity["teacher_label_accuracy"] == pytest.approx(want_accuracy, rel=1e-9)


async def test_feedback_reports_unknown_expired_duplicate_and_invalid_ids() -> None:
    rows = load_digits().data[:3].astype(np.float32)
    registry = CollectorRegistry()
    app = create_app(digits_settings(0.0, max_size=2), registry=registry)
    async with running(app) as client:
        for name, row in zip("abc", rows, strict=True):
            await infer(client, name, row)
        # "a" was pushed out by the two newer predictions (feedback.max_size = 2).
        first = await client.post(
            "/v2/models/digits/feedback",
            json=[
                {"id": "a", "label": 0},
                {"id": "b", "label": "1"},  # a class label of the card
                {"id": "c", "label": 10},  # not a class
                {"id": "zzz", "label": 1},
            ],
        )
        again = await client.post("/v2/models/digits/feedback", json=[{"id": "b", "label": 1}])
    assert first.status_code == 200
    assert first.json() == {
        "accepted": 1,
        "unknown": ["zzz"],
        "expired": ["a"],
        "duplicate": [],
        "invalid": ["c"],
    }
    assert again.json()["duplicate"] == ["b"]
    assert metric_value_total(registry) == 1


def metric_value_total(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value(
            "kdgate_calibration_samples_total",
            {"model": "digits", "version": "1", "reference": "label", "bin": str(b)},
        )
        or 0.0
        for b in range(15)
    )


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"{not json", 400), (b'{"id": "a", "label": 1}', 400), (b"[1, 2]", 400), (b"[]", 200)],
)
async def test_feedback_body_must_be_a_list_of_objects(body: bytes, status: int) -> None:
    app = create_app(digits_settings(0.0), registry=CollectorRegistry())
    async with running(app) as client:
        r = await client.post("/v2/models/digits/feedback", content=body)
    assert r.status_code == status
    if status == 400:
        assert "JSON array" in r.json()["error"]


async def test_a_large_feedback_body_does_not_hold_up_inference() -> None:
    known = load_digits().data[:100].astype(np.float32)
    app = create_app(digits_settings(0.0), registry=CollectorRegistry())
    async with running(app) as client:
        for i, row in enumerate(known):
            await infer(client, f"known-{i}", row)
        items = [{"id": f"known-{i}", "label": i % 10} for i in range(len(known))]
        items += [{"id": f"{i:032x}", "label": i % 10} for i in range(70_000)]
        body = orjson.dumps(items)
        assert 3_500_000 < len(body) < 4 * 1024 * 1024  # a 3.6 MB body was seen to stall
        # FastAPI builds its route table at the first request through it (~0.05 s here).
        assert (await client.post("/v2/models/digits/feedback", json=[])).status_code == 200
        posted = asyncio.create_task(client.post("/v2/models/digits/feedback", content=body))
        waits: list[float] = []
        while not posted.done():
            started = time.perf_counter()
            await infer(client, f"during-{len(waits)}", known[0])
            waits.append(time.perf_counter() - started)
        answer = await posted
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == len(known)
    assert len(answer.json()["unknown"]) == 70_000
    # Parsed and joined at once, the body held the loop, and so these requests, for ~0.2-0.3 s:
    # one or two of them ran, one of those waiting it out. The 90th percentile leaves room for
    # this process losing its core now and then on a busy machine.
    waits.sort()
    assert len(waits) >= 10, f"only {len(waits)} requests answered during the feedback post"
    assert waits[len(waits) * 9 // 10] < 0.1, f"90% of requests took up to {waits}"


async def test_unknown_model_is_404() -> None:
    app = create_app(digits_settings(0.0), registry=CollectorRegistry())
    async with running(app) as client:
        feedback = await client.post("/v2/models/nope/feedback", json=[])
        fidelity = await client.get("/v1/fidelity", params={"model": "nope"})
    assert feedback.status_code == fidelity.status_code == 404


async def test_fidelity_is_null_without_samples_and_counts_after() -> None:
    rows = load_digits().data[:5].astype(np.float32)
    registry = CollectorRegistry()
    app = create_app(digits_settings(1.0), registry=registry)
    async with running(app) as client:
        empty = (await client.get("/v1/fidelity")).json()
        for i, row in enumerate(rows):
            await infer(client, f"r{i}", row)
        await wait_compared(registry, 5)
        full = (await client.get("/v1/fidelity", params={"model": "digits"})).json()
    digits = empty["models"]["digits"]
    assert digits["samples"] == 0 and digits["agreement"] is None and digits["ece_teacher"] is None
    assert digits["p95_latency_seconds"] is None
    digits = full["models"]["digits"]
    assert digits["samples"] == 5 and digits["versions"]["1"]["samples"] == 5
    assert 0.0 <= digits["agreement"] <= 1.0 and digits["mean_kl"] >= 0
    assert digits["p95_latency_seconds"] > 0
    assert digits["shadow"] == {
        "fraction": 1.0,
        "teacher": "digits:1",
        "queue_rows": 0,
        "breaker": "closed",
    }
    text_agreements = registry.get_sample_value(
        "kdgate_fidelity_agreements_total", {"model": "digits", "version": "1"}
    )
    assert digits["agreement"] == text_agreements / 5


async def test_a_shadow_fraction_set_through_the_admin_api_applies_to_the_next_request(
    tmp_path: Path,
) -> None:
    settings = digits_settings(0.0).model_copy(
        update={"admin": AdminSettings(token=SecretStr("t" * 32), state_dir=tmp_path)}
    )
    registry = CollectorRegistry()
    rows = load_digits().data.astype(np.float32)[:40]
    auth = {"authorization": "Bearer " + "t" * 32}
    async with running(create_app(settings, registry=registry)) as client:
        for i, row in enumerate(rows[:20]):
            await infer(client, f"off-{i}", row)
        answer = await client.put(
            "/admin/models/digits/traffic", json={"shadow_fraction": 1.0}, headers=auth
        )
        assert answer.status_code == 200, answer.text
        for i, row in enumerate(rows[20:]):
            await infer(client, f"on-{i}", row)
        await wait_compared(registry, 20)  # exactly the 20 requests after the change
        fidelity = (await client.get("/v1/fidelity", params={"model": "digits"})).json()
    assert fidelity["models"]["digits"]["shadow"]["fraction"] == 1.0
    assert fidelity["models"]["digits"]["samples"] == 20


async def test_fidelity_and_slo_report_the_same_agreement_and_p95() -> None:
    """Both endpoints read one window: the same figures, whatever the traffic."""
    rng = np.random.default_rng(5)
    data = load_digits().data.astype(np.float32)
    rows = np.vstack([data[:150], rng.uniform(0, 16, (50, 64)).astype(np.float32)])
    registry = CollectorRegistry()
    settings = digits_settings(0.5).model_copy(
        update={"slo": digits_settings(0.5).slo.model_copy(update={"min_samples": 10})}
    )
    app = create_app(settings, registry=registry)
    async with running(app) as client:
        for i, row in enumerate(rows):
            await infer(client, f"same-{i}", row)
        shadowed = sum(zlib.crc32(f"same-{i}".encode()) < 0.5 * 2**32 for i in range(len(rows)))
        await wait_compared(registry, shadowed)
        fidelity = (await client.get("/v1/fidelity", params={"model": "digits"})).json()
        slo = (await client.get("/v1/slo")).json()
    digits = fidelity["models"]["digits"]
    by_slo = {row["slo"]: row for row in slo["slos"] if row["model"] == "digits"}
    assert digits["samples"] == by_slo["agreement"]["samples"] == shadowed
    assert digits["agreement"] == by_slo["agreement"]["observed"]
    assert digits["mean_kl"] == by_slo["kl_mean"]["observed"]
    assert digits["ece_teacher"] == by_slo["ece_teacher"]["observed"]
    assert digits["p95_latency_seconds"] is not None
    assert digits["p95_latency_seconds"] == by_slo["p95_latency"]["observed"]
    assert by_slo["p95_latency"]["samples"] == len(rows)
    assert fidelity["window_seconds"] == by_slo["agreement"]["window_seconds"]
