"""Prometheus rules rendered from the SLO config (monitoring/rules.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kdgate.monitoring.card_figures import CardFigures
from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS
from kdgate.monitoring.rules import (
    BURN_ALERTS,
    DEFAULT_RUNBOOK_BASE,
    RULES_FILE,
    dump_rules,
    duration,
    latency_bucket,
    main_rules,
    render_rules,
)
from kdgate.monitoring.slo import SloConfig, objectives_for

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy/prometheus/rules"
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
        assert runbook.startswith(DEFAULT_RUNBOOK_BASE + "/") and runbook.endswith(".md")
        assert runbook.removeprefix(DEFAULT_RUNBOOK_BASE + "/").removesuffix(".md") in RUNBOOKS
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


def committed_alerts() -> list[dict]:
    """Every alerting rule of every committed rules file (hand-written and rendered)."""
    return [
        a
        for path in sorted(RULES_DIR.glob("*.yml"))
        for a in alerts(yaml.safe_load(path.read_text()))
    ]


def test_runbook_base_flag_makes_links(capsys: pytest.CaptureFixture[str]) -> None:
    base = "https://wiki.example.com/ml/kdgate-runbooks/"
    assert main_rules(["--stdout", "--runbook-base", base], SloConfig(), ["digits"]) == 0
    links = {
        a["annotations"]["runbook_url"] for a in alerts(yaml.safe_load(capsys.readouterr().out))
    }
    expected = {f"https://wiki.example.com/ml/kdgate-runbooks/{name}.md" for name in RUNBOOKS}
    assert links == expected


@pytest.mark.parametrize("base", ["docs/runbooks/", "ftp://host/runbooks", "https://"])
def test_runbook_base_must_be_an_http_link(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_rules(["--stdout", "--runbook-base", base], SloConfig(), ["digits"])
    assert exit_info.value.code == 2
    assert "the runbook base must be an http(s) URL" in capsys.readouterr().err


def test_every_committed_runbook_url_is_a_link_to_an_existing_runbook() -> None:
    found = committed_alerts()
    assert len(found) > 10
    for alert in found:
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(DEFAULT_RUNBOOK_BASE + "/"), alert["alert"]
        assert (ROOT / "docs/runbooks" / url.removeprefix(DEFAULT_RUNBOOK_BASE + "/")).is_file()


def burn_windows(expr: str) -> list[tuple[str, str]]:
    """The (long, short) window pairs of a burn-rate expression, in order."""
    windows = re.findall(r":ratio_rate(\w+)\b", expr)
    assert windows and len(windows) % 2 == 0, expr
    return list(zip(windows[::2], windows[1::2], strict=True))


def test_one_severity_per_burn_window_in_every_rules_file() -> None:
    expected = {
        (long, short): severity
        for severity, (pairs, _) in BURN_ALERTS.items()
        for _, long, short in pairs
    }
    # The SRE workbook's choice: the fast windows page, the slow one tickets.
    assert expected == {("1h", "5m"): "page", ("6h", "30m"): "page", ("3d", "6h"): "ticket"}
    seen: dict[tuple[str, str], set[str]] = {}
    for alert in committed_alerts():
        if alert["alert"].endswith("BudgetBurn"):
            for pair in burn_windows(alert["expr"]):
                seen.setdefault(pair, set()).add(alert["labels"]["severity"])
    assert seen == {pair: {severity} for pair, severity in expected.items()}


def test_an_absent_alert_watches_the_scraped_gateway_job() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    gateway_job = prometheus["scrape_configs"][0]["job_name"]
    (absent,) = [a for a in committed_alerts() if a["expr"].startswith("absent(")]
    assert absent["expr"] == f'absent(up{{job="{gateway_job}"}} == 1)'
    assert absent["labels"] == {"severity": "page", "job": gateway_job}
