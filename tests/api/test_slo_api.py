"""GET /v1/slo, GET /v1/reports/drift and POST /v1/hooks/alertmanager on the default digits pair,
in process."""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.alertmanager import MAX_ALERTS
from kdgate.monitoring.fidelity import compare
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.slo import SLO_NAMES
from kdgate.service.app import create_app
from kdgate.service.settings import Settings, default_models_dir
from tests.support.asgi import running

pytestmark = pytest.mark.anyio


@pytest.fixture
async def digits() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings.model_validate(
        {
            "drift": {
                "executor": "thread",
                "min_rows": 10,
                "every_seconds": 3600,
                "html_report": False,
            }
        }
    )
    app = create_app(settings, registry=CollectorRegistry())
    async with running(app) as client:
        yield client


async def test_slo_status_lists_every_slo_with_its_source(digits: httpx.AsyncClient) -> None:
    answer = await digits.get("/v1/slo")
    assert answer.status_code == 200
    rows = answer.json()["slos"]
    assert [(r["model"], r["slo"]) for r in rows] == [("digits", s) for s in SLO_NAMES]
    for row in rows:
        assert row["status"] == "insufficient_data" and row["samples"] == 0
        assert row["observed"] is None and row["source"] == "default"
        assert row["min_samples"] == 200 and row["window_seconds"] == 300


async def test_drift_report_is_404_until_a_run_and_for_unknown_models(
    digits: httpx.AsyncClient,
) -> None:
    answer = await digits.get("/v1/reports/drift")
    assert answer.status_code == 404 and "no drift report" in answer.json()["error"]
    assert (await digits.get("/v1/reports/drift", params={"model": "cats"})).status_code == 404


async def test_served_inputs_reach_the_drift_buffer(digits: httpx.AsyncClient) -> None:
    with np.load(default_models_dir() / "digits/reference.npz") as data:
        rows = data["inputs"][:3]
    body = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}  # fmt: skip
    assert (await digits.post("/v2/models/digits/infer", json=body)).status_code == 200
    v1 = {"instances": rows[:1].tolist()}
    assert (await digits.post("/v1/models/digits:predict", json=v1)).status_code == 200
    app = digits._transport.app  # type: ignore[attr-defined]
    app.state.request_log.settle()  # now rather than request_log.SECONDS later
    buffered = app.state.monitoring.buffers["digits"].snapshot()
    np.testing.assert_array_equal(buffered, np.concatenate([rows, rows[:1]]))


# -- POST /v1/hooks/alertmanager --------------------------------------------------------------

TOKEN = "hook-test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def alert(**labels: Any) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": "KdgateAgreementBudgetBurn", "model": "digits", "slo": "agreement",
                   **labels},
        "annotations": {"observed": "0.4", "objective": "0.95"},
        "startsAt": "2026-02-03T04:05:06.789Z",
        "fingerprint": "0123456789abcdef",
    }  # fmt: skip


@pytest.fixture
async def hook(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    outbox = tmp_path / "state" / "outbox.sqlite3"
    settings = Settings.model_validate(
        {
            "server": {"max_body_bytes": 64 * 1024},
            "drift": {"enabled": False},
            "admin": {"token": TOKEN, "state_dir": str(tmp_path / "admin")},
            "webhook": {"outbox_path": str(outbox)},
        }
    )
    async with running(create_app(settings, registry=CollectorRegistry())) as client:
        yield client, outbox


async def test_hook_refuses_malformed_alerts_with_400(
    hook: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = hook
    listed = alert()
    listed["labels"] = [["model", "digits"]]
    numeric = alert(model=5)
    for bad, where in [(listed, "alerts[0].labels"), (numeric, "alerts[0].labels.model")]:
        answer = await client.post("/v1/hooks/alertmanager", json={"alerts": [bad]}, headers=AUTH)
        assert answer.status_code == 400, answer.text
        assert where in answer.json()["error"]


async def test_hook_skips_a_model_not_served_here_and_says_so(
    hook: tuple[httpx.AsyncClient, Path],
) -> None:
    client, outbox = hook
    body = {"alerts": [alert(model="cats"), alert()]}
    answer = await client.post("/v1/hooks/alertmanager", json=body, headers=AUTH)
    assert answer.status_code == 202
    assert len(answer.json()["queued"]) == 1
    assert answer.json()["skipped"] == [{"index": 0, "reason": "model 'cats' is not served here"}]
    assert [e.model for e in Outbox(outbox).entries()] == ["digits"]


async def test_alerts_without_fingerprint_or_startsat_are_not_one_dedup_key(
    hook: tuple[httpx.AsyncClient, Path],
) -> None:
    client, outbox = hook
    first, second = alert(slo="agreement"), alert(slo="kl_mean")
    for bare in (first, second):
        del bare["fingerprint"], bare["startsAt"]
    answer = await client.post("/v1/hooks/alertmanager", json={"alerts": [first]}, headers=AUTH)
    assert len(answer.json()["queued"]) == 1
    answer = await client.post("/v1/hooks/alertmanager", json={"alerts": [second]}, headers=AUTH)
    assert len(answer.json()["queued"]) == 1, "a different alert was taken for a duplicate"
    answer = await client.post("/v1/hooks/alertmanager", json={"alerts": [second]}, headers=AUTH)
    assert answer.json()["duplicates"] == 1  # the same one again is still a duplicate
    assert sorted(e.slo or "" for e in Outbox(outbox).entries()) == ["agreement", "kl_mean"]


async def test_hook_bounds_alerts_and_bytes_per_body(
    hook: tuple[httpx.AsyncClient, Path],
) -> None:
    client, outbox = hook
    many = {"alerts": [{"status": "firing"}] * (MAX_ALERTS + 1)}
    answer = await client.post("/v1/hooks/alertmanager", json=many, headers=AUTH)
    assert answer.status_code == 413 and "max_alerts" in answer.json()["error"]
    padded = {"alerts": [alert()], "padding": "x" * 65 * 1024}
    answer = await client.post("/v1/hooks/alertmanager", json=padded, headers=AUTH)
    assert answer.status_code == 413 and "limit" in answer.json()["error"]
    assert not outbox.exists() or Outbox(outbox).entries() == []


async def test_hook_answers_503_with_retry_after_while_the_outbox_is_unusable(
    hook: tuple[httpx.AsyncClient, Path],
) -> None:
    client, outbox = hook
    body = {"alerts": [alert()]}
    assert (await client.post("/v1/hooks/alertmanager", json=body, headers=AUTH)).status_code == 202
    shutil.rmtree(outbox.parent)
    outbox.parent.write_text("a file where the outbox directory was")
    answer = await client.post("/v1/hooks/alertmanager", json=body, headers=AUTH)
    assert answer.status_code == 503
    assert "outbox" in answer.json()["error"] and int(answer.headers["retry-after"]) > 0
    outbox.parent.unlink()
    answer = await client.post("/v1/hooks/alertmanager", json=body, headers=AUTH)
    assert answer.status_code == 202 and len(answer.json()["queued"]) == 1  # a new file


@pytest.mark.parametrize("evaluator", ["local", "fleet"])
async def test_in_fleet_mode_the_monitor_evaluates_and_exports_but_does_not_enqueue(
    tmp_path: Path, evaluator: str
) -> None:
    outbox_path = tmp_path / "outbox.sqlite3"
    secret = "whsec_" + base64.b64encode(b"fleet test signing key 32 bytes!").decode()
    settings = Settings.model_validate(
        {
            "drift": {"enabled": False},
            "slo": {
                "evaluator": evaluator,
                "min_samples": 10,
                "consecutive_breaches": 1,
                "evaluate_every_seconds": 0.05,
            },
            "admin": {"token": TOKEN, "state_dir": str(tmp_path / "admin")},
            # Nothing is sent while the incident is open: the test reads the outbox itself.
            "webhook": {
                "url": "http://127.0.0.1:9/retrain",
                "secret": secret,
                "outbox_path": str(outbox_path),
                "group_wait_seconds": 3600,
            },
        }
    )
    registry = CollectorRegistry()
    app = create_app(settings, registry=registry)
    async with running(app) as client:
        teacher = np.random.default_rng(0).normal(0, 3, (50, 10))
        app.state.monitoring.window.add_comparison("digits", "1", compare(-teacher, teacher))
        deadline = time.monotonic() + 10
        while (await client.get("/v1/slo")).json()["slos"][0]["status"] != "breached":
            assert time.monotonic() < deadline, "the monitor never saw the breach"
            await asyncio.sleep(0.05)
        assert (
            registry.get_sample_value(
                "kdgate_slo_breached", {"model": "digits", "slo": "agreement"}
            )
            == 1
        )
        outbox = Outbox(outbox_path)
        if evaluator == "local":
            breached = {"agreement", "kl_mean", "ece_teacher"}

            def queued() -> list[set[str]]:
                return [{b["slo"] for b in e.payload["data"]["breaches"]} for e in outbox.entries()]

            while queued() != [breached]:  # one request: the three join the open incident
                assert time.monotonic() < deadline, f"not one request for {breached}: {queued()}"
                await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(0.5)  # ten evaluations more: still nothing queued
            assert outbox.entries() == []
            # Alertmanager's path still queues: in a fleet it is the one that asks.
            answer = await client.post(
                "/v1/hooks/alertmanager", json={"alerts": [alert()]}, headers=AUTH
            )
            assert answer.status_code == 202 and len(answer.json()["queued"]) == 1


async def test_a_hook_request_says_where_the_capture_is_as_the_gateways_own_do(
    tmp_path: Path,
) -> None:
    """A retrain worker trains from `data.capture` whichever path asked: the hook's too."""
    outbox_path = tmp_path / "outbox.sqlite3"
    settings = Settings.model_validate(
        {
            "drift": {"enabled": False},
            "shadow": {"capture": {"dir": str(tmp_path / "capture")}},
            "admin": {"token": TOKEN, "state_dir": str(tmp_path / "admin")},
            "webhook": {"outbox_path": str(outbox_path)},
        }
    )
    segments = tmp_path / "capture" / "digits"
    segments.mkdir(parents=True)
    for n, rows in enumerate((64, 7)):
        (segments / f"capture-{n + 1:020d}-{rows}.npz").write_bytes(b"")
    async with running(create_app(settings, registry=CollectorRegistry())) as client:
        answer = await client.post(
            "/v1/hooks/alertmanager", json={"alerts": [alert()]}, headers=AUTH
        )
        assert answer.status_code == 202, answer.text
    (entry,) = Outbox(outbox_path).entries()
    assert entry.payload["data"]["capture"] == {
        "dir": str(segments.resolve()),
        "rows": 71,
        "format": "npz",
    }
