"""Rollouts through the admin API, in process, on the tabular pair (probabilities output):
auth and every refusal, pause/resume/abort, the weight lock, a low rate that only waits, and a
rollout the config starts once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from prometheus_client import CollectorRegistry
from scipy.special import softmax

from kdgate.service.app import create_app
from kdgate.service.settings import load_settings
from tests.support.asgi import running
from tests.support.fidelity_reference import brute_force_ece
from tests.support.pairs import PairCache
from tests.support.rollouts import (
    AUTH,
    INFER,
    MODEL,
    ROLLOUT,
    TRAFFIC,
    VERSIONS,
    RolloutPair,
    infer_inputs,
    infer_rows,
    tabular_rollout,
    text_rollout,
    write_rollout_config,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def made(pairs: PairCache, tmp_path: Path) -> RolloutPair:
    return tabular_rollout(pairs, tmp_path)


@pytest.fixture
async def admin(made: RolloutPair, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = write_rollout_config(tmp_path, made)
    async with running(create_app(load_settings(config), registry=CollectorRegistry())) as client:
        yield client


async def load_candidate(client: httpx.AsyncClient, card: Path, version: str = "2") -> None:
    r = await client.post(VERSIONS, json={"card": str(card), "version": version}, headers=AUTH)
    assert r.status_code == 201, r.text


async def until(
    check: Callable[[], Any], *, deadline_seconds: float = 30.0, every: float = 0.1
) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        found = await check()
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(every)


def audit_actions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(r.getMessage().removeprefix("audit "))
        for r in caplog.records
        if r.name == "kdgate.audit"
    ]


async def test_refusals_pause_resume_abort_and_the_weight_lock(
    admin: httpx.AsyncClient, made: RolloutPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kdgate.audit")
    assert (await admin.get(ROLLOUT)).status_code == 401
    assert (await admin.post(ROLLOUT, json={"candidate": "2"})).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert (await admin.get(ROLLOUT, headers=wrong)).status_code == 403
    none = await admin.get(ROLLOUT, headers=AUTH)
    assert none.status_code == 404 and "no rollout" in none.json()["error"]
    unknown_model = await admin.post(
        "/admin/models/nope/rollout", json={"candidate": "2"}, headers=AUTH
    )
    assert unknown_model.status_code == 404
    unknown_version = await admin.post(ROLLOUT, json={"candidate": "9"}, headers=AUTH)
    assert unknown_version.status_code == 404 and "'9'" in unknown_version.json()["error"]

    await load_candidate(admin, made.student_card)
    bad_bodies = {
        "increase": {"candidate": "2", "steps": [5, 5, 100]},
        "last step must have weight 100": {"candidate": "2", "steps": ["dark", 50]},
        "confidence": {"candidate": "2", "criteria": {"confidence": 2}},
        "nonsense": {"candidate": "2", "criteria": {"nonsense": 1}},
        "unknown key": {"candidate": "2", "steps": [{"weight": 100, "speed": 3}]},
        "colour": {"candidate": "2", "colour": "red"},
        "already serves": {"candidate": "1"},
    }
    for needle, bad in bad_bodies.items():
        r = await admin.post(ROLLOUT, json=bad, headers=AUTH)
        assert r.status_code == 400, (bad, r.text)
        assert needle in r.json()["error"], (needle, r.text)
    assert (await admin.get(ROLLOUT, headers=AUTH)).status_code == 404  # nothing started

    body = {"candidate": "2", "steps": ["dark", 50, 100], "criteria": {"agreement_margin": 0.05}}
    started = await admin.post(ROLLOUT, json=body, headers=AUTH)
    assert started.status_code == 201, started.text
    rollout = started.json()
    assert (rollout["state"], rollout["step"], rollout["candidate"]) == ("running", 0, "2")
    assert rollout["incumbent"] == "1" and rollout["weights"] == {"1": 100, "2": 0}
    assert [s["weight"] for s in rollout["steps"]] == [0, 50, 100]
    assert rollout["criteria"]["agreement_margin"] == 0.05
    assert rollout["criteria"]["kl_margin_nats"] == 0.02  # the defaults for the rest
    assert rollout["steps"][0]["min_samples"] == 500

    again = await admin.post(ROLLOUT, json={"candidate": "2"}, headers=AUTH)
    assert again.status_code == 409
    locked = [
        await admin.put(TRAFFIC, json={"weights": {"1": 50, "2": 50}}, headers=AUTH),
        await admin.post(f"{TRAFFIC}/promote", json={"version": "2"}, headers=AUTH),
        await admin.post(f"{TRAFFIC}/rollback", headers=AUTH),
        await admin.delete(f"{VERSIONS}/2", headers=AUTH),
    ]
    assert [r.status_code for r in locked] == [409] * 4, [r.text for r in locked]
    assert "abort it first" in locked[0].json()["error"]
    shadow = await admin.put(TRAFFIC, json={"shadow_fraction": 0.5}, headers=AUTH)
    assert shadow.status_code == 200  # only the weights are the rollout's

    steps = [("pause", 200, "paused"), ("pause", 409, None), ("resume", 200, "running")]
    steps += [("resume", 409, None), ("abort", 200, "aborted"), ("abort", 409, None)]
    for action, status, state in steps:
        r = await admin.post(f"{ROLLOUT}/{action}", headers=AUTH)
        assert r.status_code == status, (action, r.text)
        if state is not None:
            assert r.json()["state"] == state
    final = (await admin.get(ROLLOUT, headers=AUTH)).json()
    assert final["weights"] == {"1": 100, "2": 0}
    assert final["reason"] == "aborted through the admin API" and final["finished_at"]
    metrics = (await admin.get("/metrics")).text
    assert f'kdgate_rollout_state{{model="{MODEL}",state="aborted"}} 1.0' in metrics
    assert f'kdgate_rollout_state{{model="{MODEL}",state="running"}} 0.0' in metrics
    # Over: the weights are the operator's again.
    free = await admin.put(TRAFFIC, json={"weights": {"1": 90, "2": 10}}, headers=AUTH)
    assert free.status_code == 200, free.text

    actions = [a["action"] for a in audit_actions(caplog) if a["action"].startswith("rollout.")]
    assert actions == ["rollout.start", "rollout.pause", "rollout.resume", "rollout.abort"]
    abort = audit_actions(caplog)[-2]
    assert abort["rollout"]["state"] == "aborted" and abort["after"] == {"1": 100, "2": 0}


async def test_a_split_model_or_one_without_shadow_refuses_a_rollout(
    admin: httpx.AsyncClient, made: RolloutPair
) -> None:
    await load_candidate(admin, made.student_card)
    await load_candidate(admin, made.bad_card, "3")
    split = await admin.put(TRAFFIC, json={"weights": {"1": 90, "3": 10}}, headers=AUTH)
    assert split.status_code == 200
    r = await admin.post(ROLLOUT, json={"candidate": "2"}, headers=AUTH)
    assert r.status_code == 409 and "one version serving all" in r.json()["error"]
    await admin.put(TRAFFIC, json={"weights": {"1": 100}, "shadow_fraction": 0.0}, headers=AUTH)
    r = await admin.post(ROLLOUT, json={"candidate": "2"}, headers=AUTH)
    assert r.status_code == 400 and "shadow_fraction 0" in r.json()["error"]


async def test_a_low_rate_waits_and_never_advances(
    admin: httpx.AsyncClient, made: RolloutPair
) -> None:
    await load_candidate(admin, made.student_card)
    steps = [{"weight": 0, "min_samples": 200, "min_seconds": 0, "max_seconds": 600}, 100]
    r = await admin.post(ROLLOUT, json={"candidate": "2", "steps": steps}, headers=AUTH)
    assert r.status_code == 201, r.text
    served = set()
    for n in range(10):
        answer = await admin.post(INFER, json=infer_rows(made.rows[2 * n : 2 * n + 2], f"low-{n}"))
        assert answer.status_code == 200
        served.add(answer.headers["x-kdgate-model-version"])
    assert served == {"1"}  # dark: the candidate serves nobody

    async def analysed() -> dict[str, Any] | None:
        found = (await admin.get(ROLLOUT, headers=AUTH)).json()
        analysis = found.get("analysis")
        return found if analysis and analysis["samples"] == 20 else None

    rollout = await until(analysed)
    assert rollout, "the paired window never held the 20 rows"
    await asyncio.sleep(2.5)  # two more evaluations: still not enough evidence
    rollout = (await admin.get(ROLLOUT, headers=AUTH)).json()
    analysis = rollout["analysis"]
    assert (rollout["state"], rollout["step"], analysis["decision"]) == ("running", 0, "wait")
    assert "20 of 200 samples" in analysis["reason"]
    assert rollout["weights"] == {"1": 100, "2": 0}
    # The figures are there all the same: the same model on both sides agrees exactly.
    agreement = next(c for c in analysis["checks"] if c["name"] == "agreement")
    assert agreement["difference"] == 0.0
    metrics = (await admin.get("/metrics")).text
    assert f'kdgate_rollout_samples{{model="{MODEL}"}} 20.0' in metrics
    assert f'kdgate_rollout_step{{candidate="2",model="{MODEL}"}} 0.0' in metrics


async def test_the_config_starts_a_rollout_once(made: RolloutPair, tmp_path: Path) -> None:
    config = write_rollout_config(
        tmp_path,
        made,
        rollout={"candidate": "2", "steps": ["dark", 100], "min_samples": 10**6},
    )
    data = yaml.safe_load(config.read_text())
    data["models"][0]["students"].append({"version": "2", "card": str(made.student_card)})
    data["models"][0]["traffic"]["weights"] = {"1": 100}
    config.write_text(yaml.safe_dump(data))
    settings = load_settings(config)

    async def rollout_of(client: httpx.AsyncClient) -> dict[str, Any] | None:
        r = await client.get(ROLLOUT, headers=AUTH)
        return r.json() if r.status_code == 200 else None

    async with running(create_app(settings, registry=CollectorRegistry())) as client:
        first = await until(lambda: rollout_of(client))
        assert first and first["state"] == "running" and first["candidate"] == "2"
        assert first["steps"][0]["min_samples"] == 10**6  # the config's defaults
    async with running(create_app(settings, registry=CollectorRegistry())) as client:
        await asyncio.sleep(1.5)  # the driver looked at the config again
        same = await rollout_of(client)
        assert same is not None and same["started_at"] == first["started_at"]
        assert (await client.post(f"{ROLLOUT}/abort", headers=AUTH)).status_code == 200
    async with running(create_app(settings, registry=CollectorRegistry())) as client:
        await asyncio.sleep(1.5)
        ended = await rollout_of(client)
        assert ended is not None and ended["state"] == "aborted"  # not started again


async def test_a_two_input_model_pairs_every_row_and_labels_join_them(
    pairs: PairCache, tmp_path: Path
) -> None:
    made = text_rollout(pairs, tmp_path)  # input_ids + attention_mask (INT64), logits
    config = write_rollout_config(tmp_path, made)
    rollout, versions = "/admin/models/text/rollout", "/admin/models/text/versions"
    held = [{"weight": 0, "min_samples": 10**6, "min_seconds": 0, "max_seconds": 600}, 100]
    async with running(create_app(load_settings(config), registry=CollectorRegistry())) as client:
        card = {"card": str(made.student_card), "version": "2"}
        assert (await client.post(versions, json=card, headers=AUTH)).status_code == 201
        body = {"candidate": "2", "steps": held, "criteria": {"min_labels": 12}}
        assert (await client.post(rollout, json=body, headers=AUTH)).status_code == 201
        for n in range(6):
            inputs = {name: array[2 * n : 2 * n + 2] for name, array in made.inputs.items()}
            answer = await client.post("/v2/models/text/infer", json=infer_inputs(inputs, f"t-{n}"))
            assert answer.status_code == 200, answer.text

        async def checks(name: str | None = None) -> dict[str, Any] | None:
            analysis = (await client.get(rollout, headers=AUTH)).json().get("analysis") or {}
            found = {c["name"]: c for c in analysis.get("checks", [])}
            ready = analysis.get("samples") == 12 and (name is None or name in found)
            return found if ready else None

        before = await until(checks)
        assert before and "label_ece" not in before  # no labels yet: no label check
        labels = [
            {"id": f"t-{n}", "label": made.labels[2 * n : 2 * n + 2].tolist()} for n in range(6)
        ]
        joined = await client.post("/v2/models/text/feedback", json=labels)
        assert joined.json()["accepted"] == 6, joined.text
        after = await until(lambda: checks("label_ece"))
        assert after, "the labels never reached the rollout's window"
    label_ece = after["label_ece"]
    session = ort.InferenceSession(str(made.pair.student), providers=["CPUExecutionProvider"])
    rows = {name: array[:12] for name, array in made.inputs.items()}
    probs = softmax(np.asarray(session.run(["logits"], rows)[0], np.float64), axis=1)
    expected = brute_force_ece(probs, made.labels[:12])
    assert label_ece["candidate"] == pytest.approx(expected, abs=1e-6)
    assert label_ece["incumbent"] == pytest.approx(expected, abs=1e-6)
    assert label_ece["difference"] == pytest.approx(0.0, abs=1e-9)
