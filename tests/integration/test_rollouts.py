"""Rollouts on a real `kdgate serve` (uvicorn on 127.0.0.1) with the tabular pair: a candidate
equal to the incumbent is promoted step by step, a candidate with shifted classes is rolled back
at its dark step, and a rollout survives a restart at the step it had reached. Webhook events go
to a real local receiver and are verified with the official `standardwebhooks` library."""

from __future__ import annotations

import base64
import time
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from stack.receiver import Delivery, webhook_receiver
from tests.support.answers import versions_answering
from tests.support.live_server import LiveServer, live_server
from tests.support.pairs import PairCache
from tests.support.rollouts import (
    AUTH,
    INFER,
    ROLLOUT,
    VERSIONS,
    RolloutPair,
    infer_rows,
    tabular_rollout,
    write_rollout_config,
)

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"kdgate rollout test signing key 0123").decode()
ROWS_PER_REQUEST = 2


def quick_step(weight: int, min_samples: int = 60) -> dict[str, Any]:
    return {"weight": weight, "min_samples": min_samples, "min_seconds": 0.5, "max_seconds": 60}


def clients(
    server: LiveServer, made: RolloutPair, *, rate: float = 40, spread: bool = False
) -> AbstractContextManager[list[str]]:
    """Tabular requests of ROWS_PER_REQUEST rows each: versions_answering's."""

    def body(n: int) -> dict[str, Any]:
        start = (n * ROWS_PER_REQUEST) % (len(made.rows) - ROWS_PER_REQUEST)
        return infer_rows(made.rows[start : start + ROWS_PER_REQUEST], f"req-{n}")

    return versions_answering(server.url, INFER, body, rate=rate, spread=spread)


def admin(server: LiveServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=30, **kwargs)


def wait_rollout(server: LiveServer, *, until: str, step: int | None = None) -> dict[str, Any]:
    """Poll GET .../rollout until its state is `until` (and its step `step`), 90 s at most."""
    deadline = time.monotonic() + 90
    while True:
        answer = admin(server, "GET", ROLLOUT)
        # With several workers, one may not have applied the file yet (within a poll): 404.
        rollout: dict[str, Any] = answer.json() if answer.status_code == 200 else {}
        if rollout.get("state") == until and (step is None or rollout["step"] == step):
            return rollout
        assert time.monotonic() < deadline, f"{rollout}\n{server.output()[-4000:]}"
        time.sleep(0.1)


def start(server: LiveServer, card: Path, steps: list[Any], **criteria: float) -> None:
    loaded = admin(server, "POST", VERSIONS, json={"card": str(card), "version": "2"})
    assert loaded.status_code == 201, loaded.text
    body = {"candidate": "2", "steps": steps, "criteria": criteria}
    started = admin(server, "POST", ROLLOUT, json=body)
    assert started.status_code == 201, started.text


def events(deliveries: list[Delivery]) -> dict[str, list[dict[str, Any]]]:
    """Deliveries by event type (each verified with the standardwebhooks library)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for delivery in deliveries:
        Webhook(SECRET).verify(delivery.body, delivery.headers)  # raises when not
        found.setdefault(delivery.payload["type"], []).append(delivery.payload["data"])
    return found


@pytest.fixture
def made(pairs: PairCache, tmp_path: Path) -> RolloutPair:
    return tabular_rollout(pairs, tmp_path)


def test_a_candidate_as_good_as_the_incumbent_is_promoted(
    made: RolloutPair, tmp_path: Path
) -> None:
    with webhook_receiver(SECRET) as receiver:
        config = write_rollout_config(tmp_path, made, webhook_url=receiver.url, secret=SECRET)
        with live_server(config) as server, clients(server, made) as versions:
            # A generous latency slack: this test is about the steps, not a timing contest.
            steps = [quick_step(0), quick_step(50), quick_step(100)]
            start(server, made.student_card, steps, p95_slack_ms=25.0)
            rollout = wait_rollout(server, until="promoted")
            receiver.wait_for(4, deadline_seconds=30)
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            output = server.output()
        by_type = events(receiver.received())
    assert rollout["weights"] == {"1": 0, "2": 100} and rollout["step"] == 2
    assert rollout["analysis"]["decision"] == "pass"
    assert {c["name"] for c in rollout["analysis"]["checks"]} >= {"agreement", "kl", "ece"}
    assert set(versions) == {"1", "2"}  # the 50 % step served both
    assert Counter({t: len(d) for t, d in by_type.items()}) == Counter(
        {"rollout.started": 1, "rollout.step_passed": 2, "rollout.promoted": 1}
    )
    passed = sorted(by_type["rollout.step_passed"], key=lambda d: d["step"])
    assert [(d["step"], d["weight"]) for d in passed] == [(0, 0), (1, 50)]
    (promoted,) = by_type["rollout.promoted"]
    assert (promoted["model"], promoted["candidate"], promoted["incumbent"]) == (
        "tabular",
        "2",
        "1",
    )
    assert promoted["step"] == 2 and promoted["weight"] == 100
    agreement = next(c for c in promoted["checks"] if c["name"] == "agreement")
    assert agreement["difference"] == 0.0 and agreement["outcome"] == "pass"
    assert 'kdgate_rollout_state{model="tabular",state="promoted"} 1.0' in metrics
    assert 'kdgate_rollout_check{check="agreement",figure="difference",model="tabular"}' in metrics
    for action in ("rollout.start", "rollout.step", "rollout.promote"):
        assert f'"action":"{action}"' in output


def test_a_bad_candidate_is_rolled_back_at_its_dark_step(made: RolloutPair, tmp_path: Path) -> None:
    with webhook_receiver(SECRET) as receiver:
        config = write_rollout_config(tmp_path, made, webhook_url=receiver.url, secret=SECRET)
        with live_server(config) as server, clients(server, made) as versions:
            start(server, made.bad_card, [quick_step(0), 50, 100])
            rollout = wait_rollout(server, until="rolled_back")
            receiver.wait_for(2, deadline_seconds=30)
            time.sleep(0.5)  # requests after the rollback: still version 1
            output = server.output()
        by_type = events(receiver.received())
    assert rollout["step"] == 0 and rollout["weights"] == {"1": 100, "2": 0}
    assert rollout["reason"].startswith("agreement fail"), rollout["reason"]
    failed = next(c for c in rollout["analysis"]["checks"] if c["name"] == "agreement")
    assert failed["outcome"] == "fail" and failed["high"] < -0.01
    assert set(versions) == {"1"}, Counter(versions)  # the dark step served nobody the candidate
    assert len(versions) > 30
    (event,) = by_type["rollout.rolled_back"]
    assert event["reason"].startswith("agreement fail") and event["step"] == 0
    assert "rollout.promoted" not in by_type and "rollout.step_passed" not in by_type
    (audit,) = [line for line in output.splitlines() if '"action":"rollout.rollback"' in line]
    assert "agreement fail" in audit and '"after":{"1":100,"2":0}' in audit


def test_a_rollout_survives_a_restart_at_its_step(made: RolloutPair, tmp_path: Path) -> None:
    config = write_rollout_config(tmp_path, made)
    held = {"weight": 50, "min_samples": 10**6, "min_seconds": 0, "max_seconds": 3600}
    with live_server(config) as server, clients(server, made):
        start(server, made.student_card, [quick_step(0, 40), held, 100], p95_slack_ms=25.0)
        before = wait_rollout(server, until="running", step=1)
    with live_server(config) as server:
        after = admin(server, "GET", ROLLOUT).json()
        assert (after["state"], after["step"], after["started_at"]) == (
            "running",
            1,
            before["started_at"],
        )
        assert after["weights"] == {"1": 50, "2": 50}
        with clients(server, made) as versions:
            deadline = time.monotonic() + 60
            while (after.get("analysis") or {}).get("samples", 0) < 20:
                assert time.monotonic() < deadline, after
                time.sleep(0.2)
                after = admin(server, "GET", ROLLOUT).json()
        assert set(versions) == {"1", "2"}
    assert after["analysis"]["decision"] == "wait" and after["step"] == 1


def test_with_two_workers_the_leader_alone_drives(made: RolloutPair, tmp_path: Path) -> None:
    with webhook_receiver(SECRET) as receiver:
        config = write_rollout_config(tmp_path, made, webhook_url=receiver.url, secret=SECRET)
        data = yaml.safe_load(config.read_text())
        data["server"]["workers"] = 2
        config.write_text(yaml.safe_dump(data))
        # The leader judges on its own share of the traffic: every worker must get some.
        with live_server(config) as server, clients(server, made, spread=True) as versions:
            start(server, made.bad_card, [quick_step(0), 50, 100])
            rollout = wait_rollout(server, until="rolled_back")
            receiver.wait_for(2, deadline_seconds=30)
            output = server.output()
        by_type = events(receiver.received())
    assert rollout["reason"].startswith("agreement fail") and rollout["step"] == 0
    assert set(versions) == {"1"}
    assert output.count("leads this host: the rollouts of") == 1, output
    assert output.count('"action":"rollout.rollback"') == 1
    assert sorted(by_type) == ["rollout.rolled_back", "rollout.started"]
