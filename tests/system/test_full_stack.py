"""The whole stack on real binaries: gateway, teacher process, Prometheus, Alertmanager, receiver.

Clean digits traffic, then inverted digits, through the committed deploy/ configs (only
addresses and timings changed, and the SLO rules re-rendered by `kdgate rules` with test-sized
windows). The gateway's own SLO monitor is held back (a minimum sample count it never reaches),
so a retrain webhook at the receiver can only have come the fleet way: Prometheus rule ->
alert -> Alertmanager's retrain route -> POST /v1/hooks/alertmanager -> outbox -> signed webhook.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from kdgate.service.loadgen import LoadConfig, run_load
from stack.run import Ports, Secrets, Stack, running_stack
from tests.support.dashboards import panel_queries
from tests.support.live_server import REPO

pytestmark = [pytest.mark.system, pytest.mark.timeout(420)]

SECRETS = Secrets("full-stack-admin-token-" + "t" * 20, "whsec_" + "s" * 40)
WINDOW_SECONDS = 20
MIN_SAMPLES = 20
T = TypeVar("T")


def poll(what: str, probe: Callable[[], T | None], deadline_seconds: float) -> T:
    """Call `probe` until it returns something other than None; fail at the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {deadline_seconds} s")
        time.sleep(0.5)
    return found


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
    body = answer.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def agreement(stack: Stack) -> float | None:
    expr = (
        'sum(rate(kdgate_fidelity_agreements_total{model="digits"}[15s]))'
        ' / sum(rate(kdgate_fidelity_samples_total{model="digits"}[15s]))'
    )
    result = query(stack, expr)
    return float(result[0]["value"][1]) if result else None


def send(stack: Stack, seconds: float, drift: str) -> None:
    config = LoadConfig(
        url=stack.gateway.url, rate=40.0, duration_seconds=seconds, drift=drift, feedback=0.5
    )
    stats = asyncio.run(run_load(config))
    assert stats.errors == 0 and stats.ok == stats.sent, stats


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    # The fleet's rules, rendered as a user would, from an SLO config with test-sized windows.
    rules_config = workdir / "rules.yaml"
    slo = {"window_seconds": WINDOW_SECONDS, "min_samples": MIN_SAMPLES}
    rules_config.write_text(yaml.safe_dump({"slo": slo}))
    rendered = workdir / "rules"
    subprocess.run(
        [sys.executable, "-m", "kdgate.service.cli", "rules", "--config", str(rules_config),
         "--out", str(rendered)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    (slo_rules,) = rendered.glob("*.yml")
    with running_stack(
        workdir,
        SECRETS,
        ports=Ports(),
        gateway_overrides={
            "slo": {"window_seconds": WINDOW_SECONDS, "min_samples": 10**9},
            "drift": {"min_rows": 100, "every_seconds": 5},
        },
        model_overrides={"traffic": {"shadow_fraction": 1.0}},
        slo_rules=slo_rules,
    ) as running:
        yield running


def test_drift_travels_from_prometheus_to_a_signed_retrain_webhook(stack: Stack) -> None:
    send(stack, 12, "none")
    clean = poll("agreement of clean traffic in Prometheus", lambda: agreement(stack), 30)
    assert clean >= 0.95

    send(stack, 15, "invert")
    poll(
        "agreement falling in Prometheus",
        lambda: ((a := agreement(stack)) is not None and a < 0.5) or None,
        30,
    )
    alert = 'ALERTS{alertstate="firing", model="digits", slo=~"agreement|kl_mean|ece_.+"}'
    deadline = time.monotonic() + 120
    while not query(stack, alert):  # keep drifted traffic flowing until the alert fires
        assert time.monotonic() < deadline, "no fidelity alert fired within 120 s"
        send(stack, 5, "invert")

    # Alertmanager's retrain route posted to the gateway's hook (its own counter says so) ...
    def notified() -> bool | None:
        metrics = httpx.get(f"{stack.alertmanager.url}/metrics", timeout=10).text
        sent = [
            line
            for line in metrics.splitlines()
            if line.startswith('alertmanager_notifications_total{integration="webhook"')
        ]
        return (bool(sent) and float(sent[0].split()[-1]) > 0) or None

    poll("Alertmanager sending a webhook notification", notified, 60)
    # ... which queued a retrain request that reached the receiver, signed.
    deliveries = stack.receiver.wait_for(1, deadline_seconds=60)
    assert all(d.verified for d in deliveries)
    breaches = [b for d in deliveries for b in d.payload["data"]["breaches"]]
    # Only the Alertmanager path names an alert: the in-process monitor was held back.
    assert all(b.get("alertname") for b in breaches), breaches
    assert {d.payload["data"]["model"] for d in deliveries} == {"digits"}


def test_every_dashboard_query_returns_data_from_the_live_prometheus(stack: Stack) -> None:
    if not query(stack, 'kdgate_fidelity_samples_total{model="digits"}'):
        send(stack, 10, "none")
    send(stack, 5, "none")  # recent traffic for the 1m-rate panels
    empty = []
    for panel_query in panel_queries(model="digits", version="1"):
        # The rollout row has data only while a rollout runs (tests/integration/test_rollouts.py).
        if panel_query.panel.startswith("Rollout "):
            continue
        if not query(stack, panel_query.expr):
            empty.append(f"{panel_query.dashboard} / {panel_query.panel}: {panel_query.expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
