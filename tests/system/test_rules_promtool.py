"""The rendered rules under the real `promtool`, and the in-process monitor agreeing with them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from kdgate.monitoring.fidelity import Calibration, Comparison
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.rules import RULES_FILE, render_rules, write_rules
from kdgate.monitoring.slo import SloConfig, objectives_for
from kdgate.monitoring.slo_monitor import Monitor

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules" / RULES_FILE
TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests(promtool: str) -> None:
    assert TESTS, "no promtool tests in deploy/prometheus/tests"
    result = run(promtool, "test", "rules", *map(str, TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_failing_expectation_fails(promtool: str, tmp_path: Path) -> None:
    """The harness can fail: expect an alert on healthy traffic."""
    rules = write_rules(render_rules(SloConfig(), ["digits"]), tmp_path)
    test = {
        "rule_files": [str(rules)],
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'kdgate_fidelity_samples_total{model="digits",version="1"}',
                        "values": "0+600x30",
                    },
                    {
                        "series": 'kdgate_fidelity_agreements_total{model="digits",version="1"}',
                        "values": "0+600x30",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": "group by (slo) (ALERTS)",
                        "eval_time": "30m",
                        "exp_samples": [{"labels": '{slo="agreement"}', "value": 1}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "fail.test.yml"
    path.write_text(yaml.safe_dump(test))
    assert run(promtool, "test", "rules", str(path)).returncode != 0


# One synthetic scenario, fed to both evaluators: 10 compared pairs per second; at 30m agreement
# falls from 99 % to 10 % and mean KL rises from 0.01 to 0.2 nats.
STEP_SECONDS, STEPS, CHANGE_AT = 60, 70, 30
PER_STEP = 600


def per_step(step: int) -> tuple[int, int, float]:
    """(samples, agreements, KL sum) added during minute `step` (1-based)."""
    if step <= CHANGE_AT:
        return PER_STEP, 594, 6.0
    return PER_STEP, 60, 120.0


def series_values(index: int) -> str:
    totals, running = ["0"], 0.0
    for step in range(1, STEPS + 1):
        running += per_step(step)[index]
        totals.append(f"{running:g}")
    return " ".join(totals)


def comparison(samples: float, agreements: float, kl_sum: float) -> Comparison:
    """`samples` compared pairs, `agreements` of them agreeing, KL summing to `kl_sum`."""
    n = round(samples)
    none = np.zeros(15)
    calibration = Calibration(none.astype(np.int64), none, none.astype(np.int64))
    return Comparison(np.arange(n) < round(agreements), np.full(n, kl_sum / n), calibration)


def test_monitor_and_rules_agree_on_one_scenario(promtool: str, tmp_path: Path) -> None:
    config = SloConfig(
        window_seconds=300, min_samples=200, consecutive_breaches=3, evaluate_every_seconds=60
    )
    objectives = {"digits": objectives_for(None, config, "digits")}
    rules_path = write_rules(render_rules(config, objectives), tmp_path)

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    window = RecentWindow(
        window_seconds=config.window_seconds,
        bucket_seconds=config.window_seconds / config.window_buckets,
        clock=clock,
    )
    monitor = Monitor(objectives, config, Metrics(CollectorRegistry()), window)
    breached_at: dict[int, set[str]] = {}
    for step in range(1, STEPS + 1):
        clock.now = step * STEP_SECONDS - 0.5  # traffic arrives during the minute
        window.add_comparison("digits", "1", comparison(*per_step(step)))
        clock.now = step * STEP_SECONDS
        monitor.evaluate()
        breached_at[step] = {r["slo"] for r in monitor.status() if r["status"] == "breached"}

    # Steady states only: during the transition the two differ by design (the monitor judges
    # agreement against its 5m window, the rules by error-budget burn over 30m-6h windows).
    checkpoints = [10, 25, 29, 60, 70]
    assert breached_at[25] == set()  # quiet on healthy traffic
    assert breached_at[70] == {"agreement", "kl_mean"}  # fires on the collapse
    exprs = []
    for minute in checkpoints:
        expected = [
            {"labels": f'{{slo="{slo}"}}', "value": 1} for slo in sorted(breached_at[minute])
        ]
        exprs.append(
            {
                "expr": 'group by (slo) (ALERTS{alertstate="firing"})',
                "eval_time": f"{minute}m",
                "exp_samples": expected,
            }
        )
    labels = 'model="digits",version="1"'
    test = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f"kdgate_fidelity_samples_total{{{labels}}}",
                        "values": series_values(0),
                    },
                    {
                        "series": f"kdgate_fidelity_agreements_total{{{labels}}}",
                        "values": series_values(1),
                    },
                    {
                        "series": f"kdgate_fidelity_kl_divergence_nats_count{{{labels}}}",
                        "values": series_values(0),
                    },
                    {
                        "series": f"kdgate_fidelity_kl_divergence_nats_sum{{{labels}}}",
                        "values": series_values(2),
                    },
                ],
                "promql_expr_test": exprs,
            }
        ],
    }
    path = tmp_path / "scenario.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    result = run(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
