"""Render the README's picture: the key dashboard panels over a real clean -> drifted run.

    python -m stack.snapshot --out docs/img/kdgate-panels.png   # needs the `docs` extra

Runs the whole stack (stack/run.py) with every request shadowed, sends clean digits traffic
with feedback labels, then inverted digits, and plots the on-call dashboard's own PromQL (taken
from dashboards/json, variables substituted as Grafana would) over that range from the live
Prometheus. Nothing in the picture is drawn from anything but what Prometheus answered.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from stack.configs import ROOT
from stack.run import Secrets, running_stack

DASHBOARD = ROOT / "dashboards" / "json" / "kdgate-oncall.json"
# Panel title -> the y-axis label; the panels an on-call engineer looks at first.
PANELS = {
    "Agreement": "top-1 agreement",
    "Mean KL(teacher ‖ student)": "nats",
    "ECE": "ECE",
    "P95 / P99 latency": "seconds",
    "Shadow outcomes": "per second",
    "Retrain webhook deliveries": "per minute",
}
VARIABLES = {"model": "digits", "version": "1", "__rate_interval": "20s", "datasource": ""}


def panel_targets() -> dict[str, list[tuple[str, str]]]:
    """Title -> [(legend, PromQL)] for PANELS, with the dashboard variables substituted."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found: dict[str, list[tuple[str, str]]] = {}
    for panel in dashboard["panels"]:
        if panel.get("title") in PANELS:
            targets = []
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in VARIABLES.items():
                    expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
                targets.append((target.get("legendFormat", target["refId"]), expr))
            found[panel["title"]] = targets
    missing = set(PANELS) - set(found)
    if missing:
        raise SystemExit(f"panels not in {DASHBOARD.name}: {sorted(missing)}")
    return found


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{prometheus}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": "2s"},
        timeout=30,
    ).json()
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return template


def loadgen(url: str, seconds: float, drift: str, rate: float) -> None:
    subprocess.run(
        [sys.executable, "-m", "kdgate.service.cli", "loadgen", "--url", url, "--rate", str(rate),
         "--duration", str(seconds), "--drift", drift, "--feedback", "0.5"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def render(out: Path, series: dict[str, list[tuple[str, list[float], list[float]]]],
           drift_at: float, span: float) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 7), constrained_layout=True)
    for axis, (title, lines) in zip(axes.flat, series.items(), strict=True):
        for name, xs, ys in lines:
            axis.plot(xs, ys, label=name, linewidth=1.5)
        axis.axvline(drift_at, color="grey", linestyle="--", linewidth=1)
        axis.set_xlim(0, span)
        axis.set_title(title)
        axis.set_ylabel(PANELS[title])
        axis.set_xlabel("seconds (dashed: inverted digits start)")
        if lines:
            axis.legend(fontsize="small")
    figure.suptitle("kdgate on-call panels, live Prometheus: clean digits, then inverted digits")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.snapshot", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "kdgate-panels.png")
    parser.add_argument("--seconds", type=float, default=90.0, help="per phase")
    parser.add_argument("--rate", type=float, default=40.0)
    args = parser.parse_args(argv)
    targets = panel_targets()
    with tempfile.TemporaryDirectory() as workdir:
        secrets = Secrets("snapshot-admin-token-" + "x" * 24, "whsec_" + "y" * 40)
        overrides = {"slo": {"window_seconds": 30, "min_samples": 50}}
        with running_stack(
            Path(workdir), secrets, gateway_overrides=overrides,
            model_overrides={"traffic": {"shadow_fraction": 1.0}},
        ) as stack:  # fmt: skip
            start = time.time()
            loadgen(stack.gateway.url, args.seconds, "none", args.rate)
            drift_at = time.time()
            loadgen(stack.gateway.url, args.seconds, "invert", args.rate)
            time.sleep(5)  # one more scrape of the last requests
            end = time.time()
            series: dict[str, list[tuple[str, list[float], list[float]]]] = {}
            for title, queries in targets.items():
                lines = []
                for template, expr in queries:
                    for result in query_range(stack.prometheus.url, expr, start, end):
                        points = [(float(t) - start, float(v)) for t, v in result["values"]]
                        points = [(t, v) for t, v in points if v == v]  # drop NaN (0/0)
                        xs, ys = [t for t, _ in points], [v for _, v in points]
                        lines.append((legend(template, result["metric"]), xs, ys))
                series[title] = lines
    render(args.out, series, drift_at - start, end - start)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
