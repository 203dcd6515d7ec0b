"""The compose stack's Prometheus and Alertmanager configs, re-pointed at processes on loopback.

System tests (and `make stack`) run the same binaries without Docker: these helpers keep every
rule, route and receiver of deploy/ and change only where things listen, so the tests exercise
the committed configuration rather than a copy of it.

    write_prometheus_config(tmp / "prometheus.yml", gateway="127.0.0.1:41001",
                            teacher="127.0.0.1:41002", alertmanager="127.0.0.1:41003")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
SLO_RULES = "kdgate-slo.rules.yml"  # what `kdgate rules` writes


def write_prometheus_config(
    path: Path,
    *,
    gateway: str,
    teacher: str,
    alertmanager: str,
    interval: str = "1s",
    slo_rules: Path | None = None,
) -> Path:
    """deploy/prometheus/prometheus.yml with loopback targets, absolute rule paths, `interval`.

    `slo_rules` replaces the committed `kdgate rules` output (rules/kdgate-slo.rules.yml) with
    another rendering, e.g. one with test-sized windows; every other rule file stays.
    """
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    rules_dir = PROMETHEUS_CONFIG.parent
    files = sorted({p for pattern in config["rule_files"] for p in rules_dir.glob(pattern)})
    if slo_rules is not None:
        files = [f for f in files if f.name != SLO_RULES] + [slo_rules]
    config["rule_files"] = [str(f) for f in files]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    targets = {"kdgate": gateway, "kdgate-teacher": teacher}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_alertmanager_config(
    path: Path,
    *,
    gateway: str,
    receiver: str,
    token_file: Path,
    group_wait: str = "1s",
) -> Path:
    """deploy/alertmanager/alertmanager.yml posting to loopback, with short group timings."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for route in [config["route"], *config["route"]["routes"]]:
        route.update(group_wait=group_wait, group_interval=group_wait)
    for entry in config["receivers"]:
        for hook in entry.get("webhook_configs", []):
            if hook["url"].endswith("/v1/hooks/alertmanager"):
                hook["url"] = f"http://{gateway}/v1/hooks/alertmanager"
                hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
            else:
                hook["url"] = hook["url"].replace("http://receiver:8080", f"http://{receiver}")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
