"""Pairs that are not digits, in process: a two-input INT64 text-like pair in every output kind,
a teacher that names its inputs otherwise, a regression pair and pairs that cannot be compared.

Every request is shadowed; the exported figures are checked against numpy + scipy on the same
weights (tests/support/text_pair.py), never against kdgate's own maths.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from scipy.special import softmax

from kdgate.monitoring.fidelity import compare
from kdgate.monitoring.outbox import Outbox
from kdgate.service.app import create_app
from kdgate.service.settings import Settings
from tests.support.asgi import running
from tests.support.fidelity_reference import brute_force_ece, expected, from_metrics, value
from tests.support.text_pair import (
    Pair,
    reference_scores,
    text_weights,
    token_batch,
    v2_text_body,
    write_model,
    write_pair,
)

pytestmark = pytest.mark.anyio

REQUESTS = 60
ROWS = 3  # per request: 180 rows compared


def settings_for(pair: Pair, sections: dict[str, Any] | None = None, **teacher: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"warmup_runs": 1},
            "models": [
                {
                    "name": "text",
                    "students": [{"version": "1", "card": pair.student}],
                    "teacher": {"card": pair.teacher, **teacher},
                    "traffic": {"shadow_fraction": 1.0},
                }
            ],
            "drift": {"enabled": False},
            **(sections or {}),
        }
    )


def traffic(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"r{i}", *token_batch(rng, ROWS)) for i in range(REQUESTS)]


async def wait_for(registry: CollectorRegistry, outcome: str, rows: int) -> None:
    labels = {"model": "text", "outcome": outcome}
    for _ in range(1000):
        if registry.get_sample_value("kdgate_shadow_total", labels) == rows:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{registry.get_sample_value('kdgate_shadow_total', labels)} {outcome}")


async def serve(
    settings: Settings, requests: list[tuple[str, np.ndarray, np.ndarray]], labels: np.ndarray
) -> tuple[str, httpx.Response]:
    """Send every request, wait until all rows are compared, post the labels; the exposition."""
    registry = CollectorRegistry()
    async with running(create_app(settings, registry=registry)) as client:
        for request_id, ids, mask in requests:
            r = await client.post("/v2/models/text/infer", json=v2_text_body(request_id, ids, mask))
            assert r.status_code == 200, r.text
        await wait_for(registry, "compared", REQUESTS * ROWS)
        items = [
            {"id": request_id, "label": labels[i * ROWS : (i + 1) * ROWS].tolist()}
            for i, (request_id, _, _) in enumerate(requests)
        ]
        feedback = await client.post("/v2/models/text/feedback", json=items)
        return generate_latest(registry).decode(), feedback


def label_ece(text: str, version: str) -> float:
    def total(name: str, **labels: str) -> float:
        return value(text, name, model="text", version=version, reference="label", **labels)

    gap = sum(
        abs(
            total("kdgate_calibration_correct_total", bin=b)
            - total("kdgate_calibration_confidence_total", bin=b)
        )
        for b in map(str, range(15))
    )
    return gap / total("kdgate_calibration_samples_total")


@pytest.mark.parametrize(
    ("student_kind", "teacher_kind"),
    [("logits", "logits"), ("probabilities", "probabilities"), ("logits", "probabilities")],
)
async def test_two_input_pair_matches_scipy_in_every_output_kind(
    tmp_path: Path, student_kind: str, teacher_kind: str
) -> None:
    pair = write_pair(tmp_path, student_kind=student_kind, teacher_kind=teacher_kind)
    requests = traffic()
    ids = np.concatenate([r[1] for r in requests])
    mask = np.concatenate([r[2] for r in requests])
    labels = np.random.default_rng(9).integers(0, 4, len(ids))
    text, feedback = await serve(settings_for(pair), requests, labels)

    student = reference_scores(pair.student_weights, ids, mask)
    teacher = reference_scores(pair.teacher_weights, ids, mask)
    want = expected(student, teacher)
    got = from_metrics(text, model="text")
    assert value(text, "kdgate_shadow_total", model="text", outcome="compared") == len(ids)
    assert value(text, "kdgate_comparison_enabled", model="text") == 1
    assert got.samples == want.samples == len(ids)
    assert got.agreement == pytest.approx(want.agreement, rel=1e-3)
    assert got.mean_kl == pytest.approx(want.mean_kl, rel=1e-3)
    assert got.ece == pytest.approx(want.ece, rel=1e-3)
    assert 0 < want.agreement < 1 and want.mean_kl > 0.01  # not trivially equal models
    assert feedback.json()["accepted"] == REQUESTS
    assert label_ece(text, "1") == pytest.approx(
        brute_force_ece(softmax(student, axis=1), labels), rel=1e-3
    )
    assert label_ece(text, "teacher") == pytest.approx(
        brute_force_ece(softmax(teacher, axis=1), labels), rel=1e-3
    )


async def test_probabilities_and_logits_pairs_of_the_same_models_agree(tmp_path: Path) -> None:
    """The same weights with a Softmax node appended to both graphs: the same KL and ECE (the
    probabilities are not softmaxed a second time)."""
    requests = traffic(seed=3)
    labels = np.random.default_rng(4).integers(0, 4, REQUESTS * ROWS)
    figures = []
    for kind in ("logits", "probabilities"):
        pair = write_pair(tmp_path / kind, student_kind=kind, teacher_kind=kind)
        text, _ = await serve(settings_for(pair), requests, labels)
        got = from_metrics(text, model="text")
        figures.append(
            (got.agreement, got.mean_kl, got.ece, label_ece(text, "1"), label_ece(text, "teacher"))
        )
    logits_pair, probabilities_pair = figures
    assert probabilities_pair == pytest.approx(logits_pair, rel=1e-6)


async def test_a_teacher_that_names_its_inputs_otherwise_gets_them_through_input_map(
    tmp_path: Path,
) -> None:
    pair = write_pair(tmp_path, teacher_names=("ids", "mask"))
    requests = traffic(seed=5)
    ids = np.concatenate([r[1] for r in requests])
    mask = np.concatenate([r[2] for r in requests])
    settings = settings_for(pair, input_map={"input_ids": "ids", "attention_mask": "mask"})
    text, _ = await serve(settings, requests, np.zeros(len(ids), np.int64))
    want = expected(
        reference_scores(pair.student_weights, ids, mask),
        reference_scores(pair.teacher_weights, ids, mask),
    )
    got = from_metrics(text, model="text")
    assert value(text, "kdgate_shadow_total", model="text", outcome="teacher_error") == 0
    assert got.mean_kl == pytest.approx(want.mean_kl, rel=1e-3)
    assert got.agreement == pytest.approx(want.agreement, rel=1e-3)


async def test_a_regression_pair_exports_its_errors_and_no_classification(tmp_path: Path) -> None:
    student_w = text_weights(7, 1, noise_of=1)
    teacher_w = text_weights(1, 1)
    pair = Pair(
        student=write_model(tmp_path, "student", student_w, kind="regression"),
        teacher=write_model(tmp_path, "teacher", teacher_w, role="teacher", kind="regression"),
        student_weights=student_w,
        teacher_weights=teacher_w,
    )
    requests = traffic(seed=6)
    ids = np.concatenate([r[1] for r in requests])
    mask = np.concatenate([r[2] for r in requests])
    registry_text, _ = await serve(settings_for(pair), requests, np.zeros(len(ids), np.int64))
    error = np.abs(
        reference_scores(student_w, ids, mask) - reference_scores(teacher_w, ids, mask)
    ).ravel()
    relative = error / np.abs(reference_scores(teacher_w, ids, mask)).ravel()
    mv = {"model": "text", "version": "1"}
    assert value(registry_text, "kdgate_regression_abs_error_count", **mv) == len(ids)
    assert value(registry_text, "kdgate_regression_abs_error_sum", **mv) == pytest.approx(
        error.sum(), rel=1e-4
    )
    assert value(registry_text, "kdgate_regression_rel_error_sum", **mv) == pytest.approx(
        relative.sum(), rel=1e-3
    )
    assert value(registry_text, "kdgate_fidelity_samples_total", model="text") == 0
    assert value(registry_text, "kdgate_calibration_samples_total", model="text") == 0


async def test_regression_models_keep_only_latency_and_drift_objectives(tmp_path: Path) -> None:
    w = text_weights(1, 1)
    student = write_model(tmp_path, "student", w, kind="regression")
    pair = Pair(
        student, write_model(tmp_path, "teacher", w, role="teacher", kind="regression"), w, w
    )
    registry = CollectorRegistry()
    async with running(create_app(settings_for(pair), registry=registry)) as client:
        slos = (await client.get("/v1/slo")).json()
    names = {o["slo"] for o in slos["slos"] if o["model"] == "text"}
    assert names == {"p95_latency", "drift_share"}


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ({"teacher_classes": 5}, "class counts differ"),
        ({"teacher_names": ("ids", "mask")}, "the teacher needs inputs"),
        ({"student_kind": "logits", "teacher_kind": "regression"}, "cannot follow"),
    ],
)
async def test_a_pair_that_cannot_be_compared_still_serves_with_comparison_off(
    tmp_path: Path, variant: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    teacher_kind = variant.pop("teacher_kind", "logits")
    pair = write_pair(tmp_path, **variant, teacher_kind="logits")
    if teacher_kind == "regression":
        w = text_weights(1, 1)
        teacher = write_model(tmp_path, "t", w, role="teacher", kind="regression")
        pair = Pair(pair.student, teacher, pair.student_weights, w)
    registry = CollectorRegistry()
    ids, mask = token_batch(np.random.default_rng(0), 2)
    with caplog.at_level(logging.WARNING, logger="kdgate.service.monitoring_runtime"):
        async with running(create_app(settings_for(pair), registry=registry)) as client:
            r = await client.post("/v2/models/text/infer", json=v2_text_body("a", ids, mask))
            text = generate_latest(registry).decode()
    assert r.status_code == 200
    np.testing.assert_allclose(
        np.asarray(r.json()["outputs"][0]["data"]).reshape(2, -1),
        reference_scores(pair.student_weights, ids, mask),
        rtol=1e-5,
        atol=1e-5,
    )
    assert value(text, "kdgate_comparison_enabled", model="text") == 0
    assert value(text, "kdgate_shadow_total", model="text") == 0
    lines = [r.getMessage() for r in caplog.records if "comparison" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines


async def test_the_capture_holds_every_input_and_the_retrain_request_says_where(
    tmp_path: Path,
) -> None:
    pair = write_pair(tmp_path, student_kind="logits", teacher_kind="probabilities")
    secret = "whsec_" + base64.b64encode(b"pairs test signing key, 32 bytes").decode()
    settings = settings_for(
        pair,
        sections={
            "shadow": {"capture": {"dir": str(tmp_path / "capture"), "segment_rows": 16}},
            # More samples than the traffic below: the pair's own disagreement never breaches
            # (the request would then name a capture still being written); the injected one does.
            "slo": {"min_samples": 500, "consecutive_breaches": 1, "evaluate_every_seconds": 0.05},
            "webhook": {
                "url": "http://127.0.0.1:9/retrain",
                "secret": secret,
                "outbox_path": str(tmp_path / "outbox.sqlite3"),
                "group_wait_seconds": 3600,
            },
        },
    )
    requests = traffic(seed=8)
    ids = np.concatenate([r[1] for r in requests])
    mask = np.concatenate([r[2] for r in requests])
    registry = CollectorRegistry()
    app = create_app(settings, registry=registry)
    async with running(app) as client:
        for request_id, x, m in requests:
            r = await client.post("/v2/models/text/infer", json=v2_text_body(request_id, x, m))
            assert r.status_code == 200
        await wait_for(registry, "compared", len(ids))
        runtime = app.state.monitoring
        await runtime.models["text"].capture.drain()
        teacher = np.random.default_rng(0).normal(0, 3, (1000, 4))
        runtime.window.add_comparison("text", "1", compare(-teacher, teacher))  # a breach
        outbox = Outbox(tmp_path / "outbox.sqlite3")
        deadline = time.monotonic() + 10
        while not outbox.entries():
            assert time.monotonic() < deadline, "no retrain request"
            await asyncio.sleep(0.05)
        (entry,) = outbox.entries()[:1]
    where = entry.payload["data"]["capture"]
    assert where == {
        "dir": str((tmp_path / "capture" / "text").resolve()),
        "rows": len(ids),
        "format": "npz",
    }
    arrays = load_segments(Path(where["dir"]))
    assert str(arrays["teacher_kind"]) == "probabilities"
    np.testing.assert_array_equal(arrays["inputs/input_ids"], ids)
    np.testing.assert_array_equal(arrays["inputs/attention_mask"], mask)
    np.testing.assert_allclose(
        arrays["teacher_scores"],
        softmax(reference_scores(pair.teacher_weights, ids, mask), axis=1),
        rtol=1e-5,
        atol=1e-7,
    )


def load_segments(directory: Path) -> dict[str, np.ndarray]:
    """Every array of a capture directory's segments, concatenated in name (age) order."""
    parts: dict[str, list[np.ndarray]] = {}
    for path in sorted(directory.glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                parts.setdefault(key, []).append(npz[key])
    kind = {str(k) for k in parts.pop("teacher_kind")}
    assert len(kind) == 1
    return {
        "teacher_kind": np.array(kind.pop()),
        **{k: np.concatenate(v) for k, v in parts.items()},
    }
