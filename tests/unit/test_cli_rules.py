"""`kdgate rules`: the committed Prometheus rules are a fresh render of the default config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdgate.monitoring.rules import RULES_FILE
from kdgate.service.cli import main

COMMITTED = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / RULES_FILE


def test_committed_rules_equal_a_fresh_render(tmp_path: Path) -> None:
    assert main(["rules", "--out", str(tmp_path)]) == 0
    assert (tmp_path / RULES_FILE).read_text() == COMMITTED.read_text(), (
        "deploy/prometheus/rules is stale: run `kdgate rules`"
    )


def test_config_objectives_reach_the_rules(tmp_path: Path) -> None:
    config = tmp_path / "kdgate.yaml"
    config.write_text(yaml.safe_dump({"slo": {"kl_mean_max": 0.08, "window_seconds": 600}}))
    assert main(["rules", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    rules = yaml.safe_load((tmp_path / "out" / RULES_FILE).read_text())
    (kl,) = [r for r in rules["groups"][1]["rules"] if r["labels"]["slo"] == "kl_mean"]
    assert "mean10m" in kl["expr"] and "> 0.08" in kl["expr"]


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--stdout"]) == 0
    assert capsys.readouterr().out == COMMITTED.read_text()
