"""Prometheus rules rendered from the SLO config (monitoring/rules.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdgate.monitoring.card_figures import CardFigures
from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS
from kdgate.monitoring.rules import (
    RULES_FILE,
    dump_rules,
    duration,
    latency_bucket,
    main_rules,
    render_rules,
)
from kdgate.monitoring.slo import SloConfig, objectives_for

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = {"latency", "agreement-drop", "kl", "calibration", "input-drift"}


def alerts(rules: dict) -> list[dict]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_committed_rules_are_the_default_rendering() -> None:
    committed = (ROOT / "deploy/prometheus/rules" / RULES_FILE).read_text()
    assert committed == dump_rules(render_rules(SloConfig(), ["digits"])), (
        "re-render with `kdgate rules`"
    )


def test_every_alert_is_labelled_and_annotated() -> None:
    rendered = alerts(render_rules(SloConfig(), ["digits", "other"]))
    slos = {"agreement", "kl_mean", "ece_teacher", "ece_label", "p95_latency", "drift_share"}
    assert {a["labels"]["slo"] for a in rendered} == slos
    for alert in rendered:
        assert alert["labels"]["severity"] in {"page", "ticket"}
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"]
        runbook = annotations["runbook_url"]
        assert runbook.startswith("docs/runbooks/") and runbook.endswith(".md")
        assert runbook.removeprefix("docs/runbooks/").removesuffix(".md") in RUNBOOKS
        by = "by (model)" if alert["labels"]["slo"] == "drift_share" else "(model, version)"
        assert by in alert["expr"]
    # Both models get their own alerts.
    assert sum('model="other"' in a["expr"] for a in rendered) == len(rendered) / 2


def test_burn_rate_thresholds_follow_the_budget() -> None:
    rendered = alerts(render_rules(SloConfig(agreement_min=0.99), ["digits"]))
    page = next(a for a in rendered if a["labels"] == {"severity": "page", "slo": "agreement"})
    # budget 0.01: 14.4x -> 0.144, 6x -> 0.06
    assert 'ratio_rate1h{model="digits"} > 0.144' in page["expr"]
    assert 'ratio_rate5m{model="digits"} > 0.144' in page["expr"]
    assert 'ratio_rate6h{model="digits"} > 0.06' in page["expr"]
    ticket = next(a for a in rendered if a["labels"] == {"severity": "ticket", "slo": "agreement"})
    assert 'ratio_rate3d{model="digits"} > 0.01' in ticket["expr"]


def test_card_derived_objectives_reach_the_rules() -> None:
    config = SloConfig()
    objectives = {"digits": objectives_for(CardFigures(kl_mean_nats=0.08), config, "digits")}
    kl = next(
        a for a in alerts(render_rules(config, objectives)) if a["labels"]["slo"] == "kl_mean"
    )
    assert "> 0.16" in kl["expr"]
    assert "model card" in kl["annotations"]["description"]


def test_threshold_alerts_carry_the_hysteresis() -> None:
    config = SloConfig(consecutive_breaches=4, evaluate_every_seconds=15, window_seconds=600)
    kl = next(
        a for a in alerts(render_rules(config, ["digits"])) if a["labels"]["slo"] == "kl_mean"
    )
    assert kl["for"] == kl["keep_firing_for"] == "1m"
    assert "mean10m" in kl["expr"] and ">= 200" in kl["expr"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(300, "5m"), (3600, "1h"), (90, "90s"), (86400 * 3, "3d"), (45, "45s")]
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_latency_bucket_is_the_largest_bound_not_above_the_objective() -> None:
    assert latency_bucket(0.1) == 0.1
    assert latency_bucket(0.12) == 0.1
    assert latency_bucket(0.00001) == LATENCY_BUCKETS_SECONDS[0]
    for objective in (0.0003, 0.02, 0.2, 3.0):
        bound = latency_bucket(objective)
        assert bound <= objective
        assert all(b <= bound or b > objective for b in LATENCY_BUCKETS_SECONDS)


def test_main_rules_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_rules(["--out", str(tmp_path)], SloConfig(), ["digits"]) == 0
    written = yaml.safe_load((tmp_path / RULES_FILE).read_text())
    assert written == render_rules(SloConfig(), ["digits"])
    assert str(tmp_path / RULES_FILE) in capsys.readouterr().out
