"""Writes the three kdgate Grafana dashboards (executive, on-call, debug) to dashboards/json/.

The JSON files are the artefact Grafana provisions; this script is their source, so that thirty
panels share one datasource reference, one layout rule and one set of PromQL building blocks.
Run it after editing, and commit both: `python dashboards/generate.py`
(tests/unit/test_dashboards.py fails while the files and this script disagree).

Every query reads the raw counters and histograms of DESIGN.md section 3 directly (never a
recording rule), so a dashboard works on any Prometheus that scrapes kdgate.

A panel an alert points at links that alert's runbook (the panel's link menu), at the URL the
alert's `runbook_url` carries (monitoring/rules.py, DEFAULT_RUNBOOK_BASE).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdgate.monitoring.rules import DEFAULT_RUNBOOK_BASE, runbook_url

OUT_DIR = Path(__file__).resolve().parent / "json"
SCHEMA_VERSION = 39
GRID_WIDTH = 24

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model="$model"'
SEL = 'model="$model",version=~"$version"'
W = "$__rate_interval"

Json = dict[str, Any]
Panel = Json


# ---------------------------------------------------------------- PromQL building blocks


def agreement(window: str = W, by: str = "version") -> str:
    return (
        f"sum by ({by}) (rate(kdgate_fidelity_agreements_total{{{SEL}}}[{window}]))\n/\n"
        f"sum by ({by}) (rate(kdgate_fidelity_samples_total{{{SEL}}}[{window}]))"
    )


def mean_kl(by: str = "version") -> str:
    return (
        f"sum by ({by}) (rate(kdgate_fidelity_kl_divergence_nats_sum{{{SEL}}}[{W}]))\n/\n"
        f"sum by ({by}) (rate(kdgate_fidelity_kl_divergence_nats_count{{{SEL}}}[{W}]))"
    )


def ece(reference: str, selector: str = SEL) -> str:
    """DESIGN.md's ECE: sum over bins of |correct - confidence|, over samples, per version."""
    sel = f'{selector},reference="{reference}"'
    return (
        "sum by (version) (abs(\n"
        f"    sum by (version, bin) (rate(kdgate_calibration_correct_total{{{sel}}}[{W}]))\n"
        f"  - sum by (version, bin) (rate(kdgate_calibration_confidence_total{{{sel}}}[{W}]))\n"
        "))\n/\n"
        f"sum by (version) (rate(kdgate_calibration_samples_total{{{sel}}}[{W}]))"
    )


def label_accuracy(selector: str, by: str = "version") -> str:
    sel = f'{selector},reference="label"'
    return (
        f"sum by ({by}) (rate(kdgate_calibration_correct_total{{{sel}}}[{W}]))\n/\n"
        f"sum by ({by}) (rate(kdgate_calibration_samples_total{{{sel}}}[{W}]))"
    )


def latency_quantile(q: float, by: str = "version") -> str:
    return (
        f"histogram_quantile({q}, sum by ({by}, le) "
        f"(rate(kdgate_request_duration_seconds_bucket{{{SEL}}}[{W}])))"
    )


def error_ratio() -> str:
    # `or ... * 0` keeps a 0 line while no 5xx series exists yet, so the panel is never empty.
    requests = f"sum by (version) (rate(kdgate_requests_total{{{SEL}}}[{W}]))"
    errors = f'sum by (version) (rate(kdgate_requests_total{{{SEL},code=~"5.."}}[{W}]))'
    return f"({errors}\n  or {requests} * 0)\n/\n{requests}"


def shadow_share(outcome: str) -> str:
    total = f"sum(rate(kdgate_shadow_total{{{MODEL}}}[{W}]))"
    return f'sum(rate(kdgate_shadow_total{{{MODEL},outcome="{outcome}"}}[{W}]))\n/\n{total}'


def agreement_burn_rate(window: str) -> str:
    """Error-budget burn rate of the agreement SLO: (1 - agreement) / (1 - objective)."""
    return f"(1 - ({agreement(window, by='model')}))\n/ (1 - $agreement_objective)"


def latency_burn_rate(window: str) -> str:
    """Burn rate of "95% of requests within the P95 objective" (the bucket `le` must exist)."""
    fast = (
        f"sum(rate(kdgate_request_duration_seconds_bucket"
        f'{{{SEL},le="$latency_objective_seconds"}}[{window}]))'
    )
    total = f"sum(rate(kdgate_request_duration_seconds_count{{{SEL}}}[{window}]))"
    return f"(1 - {fast} / {total}) / 0.05"


# ---------------------------------------------------------------- panels


def target(expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False) -> Json:
    return {
        "refId": ref,
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "editorMode": "code",
    }


def targets(*queries: tuple[str, str], instant: bool = False) -> list[Json]:
    return [
        target(expr, legend, chr(ord("A") + i), instant=instant)
        for i, (expr, legend) in enumerate(queries)
    ]


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def panel(
    kind: str,
    title: str,
    description: str,
    queries: list[Json],
    *,
    width: int = 12,
    height: int = 8,
    unit: str = "short",
    steps: Json | None = None,
    options: Json | None = None,
    runbook: str | None = None,
    **extra: Any,
) -> Panel:
    defaults: dict[str, Any] = {"unit": unit}
    if steps is not None:
        defaults["thresholds"] = steps
    if kind == "timeseries" and steps is not None:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    if runbook is not None:
        extra["links"] = [runbook_link(runbook)]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": queries,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
        "gridPos": {"w": width, "h": height},
        **extra,
    }


def runbook_link(runbook: str) -> Json:
    """A panel link to the runbook `docs/runbooks/<runbook>.md`, opened in a new tab.

    Grafana reads title, url and targetBlank of a panel link; its published schema types panel
    links as dashboard links, so the other fields are there, with their neutral values.
    """
    return {
        "title": f"Runbook: {runbook}",
        "type": "link",
        "url": runbook_url(DEFAULT_RUNBOOK_BASE, runbook),
        "tooltip": "What to check and do when this panel's alert fires",
        "icon": "doc",
        "tags": [],
        "asDropdown": False,
        "includeVars": False,
        "keepTime": False,
        "targetBlank": True,
    }


def stat(title: str, description: str, expr: str, legend: str = "", **kw: Any) -> Panel:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return panel("stat", title, description, targets((expr, legend)), options=options, **kw)


def bins(title: str, description: str, expr: str, **kw: Any) -> Panel:
    """Bar gauge with one bar per calibration bin, over the dashboard's time range."""
    options = {
        "displayMode": "basic",
        "orientation": "vertical",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    queries = targets((expr, "bin {{bin}}"), instant=True)
    return panel("bargauge", title, description, queries, options=options, **kw)


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24}}


AGREEMENT_STEPS = thresholds((None, "red"), (0.95, "green"))
LATENCY_STEPS = thresholds((None, "green"), (0.1, "red"))
# The alerts' table (monitoring/rules.py BURN_ALERTS): 14.4x over 1h and 6x over 6h page, 1x over
# 3d tickets. A line past 6 is red: on the 6h window that pages.
BURN_STEPS = thresholds((None, "green"), (1, "orange"), (6, "red"))
BURN_SEVERITIES = "14.4 over 1h or 6 over 6h pages, 1 over 3 days tickets."


def layout(panels: Iterable[Panel]) -> list[Panel]:
    """Gives every panel an id and an x/y position, filling rows of 24 columns left to right."""
    placed, x, y, row_height = [], 0, 0, 0
    for number, item in enumerate(panels, start=1):
        grid = dict(item["gridPos"])
        grid.setdefault("h", 1)
        if item["type"] == "row" or x + grid["w"] > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        grid.update(x=x, y=y)
        x += grid["w"]
        row_height = max(row_height, grid["h"])
        placed.append({"id": number, **item, "gridPos": grid})
    return placed


# ---------------------------------------------------------------- variables and dashboards


def query_variable(name: str, label: str, query: str, *, multi: bool) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "options": [],
        "hide": 0,
    }


def textbox(name: str, label: str, value: str, description: str) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "textbox",
        "description": description,
        "query": value,
        "current": {"text": value, "value": value},
        "options": [{"selected": True, "text": value, "value": value}],
        "hide": 0,
    }


def variables(*extra: Json) -> Json:
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "options": [],
        "refresh": 1,
        "regex": "",
        "hide": 0,
    }
    model = query_variable(
        "model", "Model", "label_values(kdgate_requests_total, model)", multi=False
    )
    version = query_variable(
        "version",
        "Student version",
        'label_values(kdgate_requests_total{model="$model"}, version)',
        multi=True,
    )
    return {"list": [datasource, model, version, *extra]}


def dashboard(uid: str, title: str, description: str, panels: list[Panel], **kw: Any) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["kdgate"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "links": [
            {
                "title": "kdgate dashboards",
                "type": "dashboards",
                "tags": ["kdgate"],
                "icon": "external link",
                "tooltip": "",
                "targetBlank": False,
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": kw.pop("templating", variables()),
        "panels": layout(panels),
        **kw,
    }


def executive() -> Json:
    student_acc = label_accuracy(SEL, by="model")
    teacher_acc = label_accuracy('model="$model",version="teacher"', by="model")
    panels = [
        stat(
            "Agreement with the teacher",
            "Share of shadowed requests where student and teacher pick the same class.",
            agreement(by="model"),
            width=5,
            height=5,
            unit="percentunit",
            steps=AGREEMENT_STEPS,
        ),
        stat(
            "Label accuracy: student minus teacher",
            "Accuracy against feedback labels, student minus teacher (negative: the student "
            "is worse). Needs labels posted to the feedback API.",
            f"({student_acc})\n-\n({teacher_acc})",
            width=5,
            height=5,
            unit="percentunit",
            steps=thresholds((None, "red"), (-0.02, "green")),
        ),
        stat(
            "Requests / s",
            "Requests served by the selected student versions.",
            f"sum(rate(kdgate_requests_total{{{SEL}}}[{W}]))",
            width=4,
            height=5,
            unit="reqps",
        ),
        stat(
            "P95 latency",
            "Server-side P95 request latency.",
            latency_quantile(0.95, by="model"),
            width=4,
            height=5,
            unit="s",
            steps=LATENCY_STEPS,
        ),
        stat(
            "SLO status",
            "1 while the in-process monitor sees the SLO breached (kdgate_slo_breached).",
            f"max by (slo) (kdgate_slo_breached{{{MODEL}}})",
            "{{slo}}",
            width=6,
            height=5,
            steps=thresholds((None, "green"), (1, "red")),
        ),
        panel(
            "timeseries",
            "Agreement over time",
            "Top-1 agreement with the teacher per student version; the line is the objective.",
            targets((agreement(), "v{{version}}")),
            unit="percentunit",
            steps=AGREEMENT_STEPS,
        ),
        panel(
            "timeseries",
            "Label accuracy: student vs teacher",
            "Accuracy against feedback labels; version 'teacher' is the teacher on the same "
            "requests.",
            targets((label_accuracy('model="$model",version=~"$version|teacher"'), "{{version}}")),
            unit="percentunit",
        ),
        panel(
            "timeseries",
            "Request volume",
            "Requests per second by status code.",
            targets((f"sum by (code) (rate(kdgate_requests_total{{{SEL}}}[{W}]))", "{{code}}")),
            unit="reqps",
        ),
        panel(
            "timeseries",
            "Latency",
            "Server-side latency quantiles over all selected versions.",
            targets(
                (latency_quantile(0.5, by="model"), "P50"),
                (latency_quantile(0.95, by="model"), "P95"),
                (latency_quantile(0.99, by="model"), "P99"),
            ),
            unit="s",
            steps=LATENCY_STEPS,
        ),
    ]
    return dashboard(
        "kdgate-executive",
        "kdgate / Executive",
        "Is the distilled student as good as its teacher, and is the service healthy?",
        panels,
    )


def oncall() -> Json:
    burn_windows = ("5m", "1h", "6h")
    panels = [
        row("Service"),
        panel(
            "timeseries",
            "P95 / P99 latency",
            "Server-side latency per student version.",
            targets(
                (latency_quantile(0.95), "P95 v{{version}}"),
                (latency_quantile(0.99), "P99 v{{version}}"),
            ),
            width=8,
            unit="s",
            steps=LATENCY_STEPS,
        ),
        panel(
            "timeseries",
            "Error rate (5xx)",
            "Share of requests answered with a 5xx. 4xx (bad input) is the caller's error "
            "and not counted.",
            targets((error_ratio(), "v{{version}}")),
            runbook="availability",
            width=8,
            unit="percentunit",
            steps=thresholds((None, "green"), (0.01, "red")),
        ),
        panel(
            "timeseries",
            "Latency SLO burn rate",
            "How fast the latency error budget (5% of requests slower than the objective) "
            f"burns; {BURN_SEVERITIES}",
            targets(*((latency_burn_rate(w), w) for w in burn_windows)),
            runbook="latency",
            width=8,
            steps=BURN_STEPS,
        ),
        row("Fidelity"),
        panel(
            "timeseries",
            "Agreement",
            "Top-1 agreement with the teacher.",
            targets((agreement(), "v{{version}}")),
            runbook="agreement-drop",
            width=6,
            unit="percentunit",
            steps=AGREEMENT_STEPS,
        ),
        panel(
            "timeseries",
            "Mean KL(teacher ‖ student)",
            "Mean KL divergence per compared sample, in nats.",
            targets((mean_kl(), "v{{version}}")),
            runbook="kl",
            width=6,
            steps=thresholds((None, "green"), (0.05, "red")),
        ),
        panel(
            "timeseries",
            "ECE",
            "Expected calibration error (15 bins) against the teacher's top-1 and against "
            "feedback labels.",
            targets(
                (ece("teacher"), "vs teacher v{{version}}"),
                (ece("label"), "vs labels v{{version}}"),
            ),
            runbook="calibration",
            width=6,
            steps=thresholds((None, "green"), (0.05, "red")),
        ),
        panel(
            "timeseries",
            "Agreement SLO burn rate",
            f"How fast the agreement error budget burns; {BURN_SEVERITIES}",
            targets(*((agreement_burn_rate(w), w) for w in burn_windows)),
            runbook="agreement-drop",
            width=6,
            steps=BURN_STEPS,
        ),
        row("Shadow and retrain"),
        panel(
            "timeseries",
            "Shadow outcomes",
            "Shadow samples per second by outcome: compared, dropped (queue full), teacher_error.",
            targets(
                (f"sum by (outcome) (rate(kdgate_shadow_total{{{MODEL}}}[{W}]))", "{{outcome}}")
            ),
            width=6,
            unit="ops",
        ),
        panel(
            "timeseries",
            "Shadow drops",
            "Share of shadow samples dropped because the queue was full.",
            targets((shadow_share("dropped"), "dropped")),
            runbook="shadow-drops",
            width=6,
            unit="percentunit",
            steps=thresholds((None, "green"), (0.1, "red")),
        ),
        panel(
            "timeseries",
            "Teacher errors",
            "Share of shadow samples the teacher failed on.",
            targets((shadow_share("teacher_error"), "teacher_error")),
            runbook="teacher-down",
            width=6,
            unit="percentunit",
            steps=thresholds((None, "green"), (0.5, "red")),
        ),
        panel(
            "timeseries",
            "Retrain webhook deliveries",
            "Retrain webhook attempts by outcome.",
            targets(
                (
                    f"sum by (outcome) (increase(kdgate_retrain_requests_total{{{MODEL}}}[{W}]))",
                    "{{outcome}}",
                )
            ),
            runbook="webhook-failing",
            width=6,
        ),
    ]
    extra = (
        textbox(
            "agreement_objective",
            "Agreement objective",
            "0.95",
            "slo.agreement_min of the gateway config",
        ),
        textbox(
            "latency_objective_seconds",
            "P95 objective (s)",
            "0.1",
            "slo.p95_latency_max_seconds; must be a latency bucket boundary",
        ),
    )
    return dashboard(
        "kdgate-oncall",
        "kdgate / On-call",
        "Everything an alert links to: latency, errors, fidelity, burn rates, shadow health.",
        panels,
        templating=variables(*extra),
    )


def debug() -> Json:
    teacher_ref = f'{SEL},reference="teacher"'
    per_bin = "sum by (bin) (increase(kdgate_calibration_{}_total{{{}}}[$__range]))"
    panels = [
        row("Calibration (reference = teacher, over the time range)"),
        bins(
            "Confidence histogram",
            "Compared samples per top-1 confidence bin; bin i covers [i/15, (i+1)/15).",
            per_bin.format("samples", teacher_ref),
            width=8,
        ),
        bins(
            "Per-bin accuracy",
            "Share of samples in each bin whose top-1 matched the teacher.",
            f"{per_bin.format('correct', teacher_ref)}\n/\n"
            f"{per_bin.format('samples', teacher_ref)}",
            width=8,
            unit="percentunit",
        ),
        bins(
            "Per-bin mean confidence",
            "Mean top-1 confidence in each bin; a calibrated student matches per-bin accuracy.",
            f"{per_bin.format('confidence', teacher_ref)}\n/\n"
            f"{per_bin.format('samples', teacher_ref)}",
            width=8,
            unit="percentunit",
        ),
        row("KL divergence"),
        panel(
            "heatmap",
            "KL distribution",
            "Per-sample KL(teacher ‖ student) in nats, as histogram buckets over time.",
            [
                {
                    **target(
                        "sum by (le) (increase("
                        f"kdgate_fidelity_kl_divergence_nats_bucket{{{SEL}}}[{W}]))",
                        "{{le}}",
                    ),
                    "format": "heatmap",
                }
            ],
            options={"calculate": False, "yAxis": {"unit": "short"}},
        ),
        panel(
            "timeseries",
            "KL quantiles",
            "P50 / P95 / P99 of per-sample KL, in nats.",
            targets(
                *(
                    (
                        f"histogram_quantile({q}, sum by (le) (rate("
                        f"kdgate_fidelity_kl_divergence_nats_bucket{{{SEL}}}[{W}])))",
                        f"P{round(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                )
            ),
        ),
        row("Inputs and shadow queue"),
        panel(
            "timeseries",
            "Input drift share",
            "Share of input columns Evidently finds drifted against the reference sample.",
            targets((f"max(kdgate_input_drift_share{{{MODEL}}})", "drift share")),
            runbook="input-drift",
            unit="percentunit",
            steps=thresholds((None, "green"), (0.5, "red")),
        ),
        panel(
            "timeseries",
            "Shadow queue depth",
            "Samples waiting for the teacher (the queue is bounded; when full, samples drop).",
            targets((f"sum(kdgate_shadow_queue_depth{{{MODEL}}})", "queued")),
        ),
        row("Canary vs stable"),
        panel(
            "timeseries",
            "Traffic weight",
            "Configured traffic weight per student version, in percent.",
            targets((f"max by (version) (kdgate_traffic_weight{{{SEL}}})", "v{{version}}")),
            width=8,
        ),
        panel(
            "timeseries",
            "Requests / s",
            "Requests per second per student version.",
            targets(
                (f"sum by (version) (rate(kdgate_requests_total{{{SEL}}}[{W}]))", "v{{version}}")
            ),
            width=8,
            unit="reqps",
        ),
        panel(
            "timeseries",
            "P95 latency",
            "Server-side P95 per student version.",
            targets((latency_quantile(0.95), "v{{version}}")),
            width=8,
            unit="s",
        ),
        panel(
            "timeseries",
            "Agreement",
            "Top-1 agreement with the teacher per student version.",
            targets((agreement(), "v{{version}}")),
            width=8,
            unit="percentunit",
            steps=AGREEMENT_STEPS,
        ),
        panel(
            "timeseries",
            "Mean KL",
            "Mean KL(teacher ‖ student) per student version, in nats.",
            targets((mean_kl(), "v{{version}}")),
            width=8,
        ),
        panel(
            "timeseries",
            "ECE vs teacher",
            "Expected calibration error against the teacher per student version.",
            targets((ece("teacher"), "v{{version}}")),
            width=8,
        ),
        row("Rollout"),
        stat(
            "Rollout state",
            "State of the model's latest rollout (docs/rollouts.md).",
            f"max by (state) (kdgate_rollout_state{{{MODEL}}}) == 1",
            "{{state}}",
            width=4,
        ),
        panel(
            "timeseries",
            "Rollout step",
            "Index of the current step of the rollout, per candidate version.",
            targets((f"max by (candidate) (kdgate_rollout_step{{{MODEL}}})", "v{{candidate}}")),
            width=4,
        ),
        panel(
            "timeseries",
            "Rollout paired samples",
            "Rows in the current step's paired window (both versions on the same inputs).",
            targets((f"max(kdgate_rollout_samples{{{MODEL}}})", "samples")),
            width=4,
        ),
        panel(
            "timeseries",
            "Rollout agreement: candidate - incumbent",
            "Difference of agreement with the teacher and its interval; the step fails once "
            "high is below -agreement_margin, passes once low is above it.",
            targets(
                (
                    f'max by (figure) (kdgate_rollout_check{{{MODEL},check="agreement",'
                    'figure=~"difference|low|high"})',
                    "{{figure}}",
                )
            ),
            width=6,
        ),
        panel(
            "timeseries",
            "Rollout mean KL: candidate - incumbent",
            "Difference of mean KL(teacher ‖ version), nats, and its interval.",
            targets(
                (
                    f'max by (figure) (kdgate_rollout_check{{{MODEL},check="kl",'
                    'figure=~"difference|low|high"})',
                    "{{figure}}",
                )
            ),
            width=6,
        ),
        panel(
            "timeseries",
            "Rollout P95 latency",
            "Nearest-rank P95 of each version's run on the shadowed inputs, in ms.",
            targets(
                (
                    f'max by (figure) (kdgate_rollout_check{{{MODEL},check="p95_latency",'
                    'figure=~"candidate|incumbent"})',
                    "{{figure}}",
                )
            ),
            width=12,
            unit="ms",
        ),
    ]
    return dashboard(
        "kdgate-debug",
        "kdgate / Debug",
        "Why fidelity moved: calibration bins, the KL distribution, input drift, the shadow "
        "queue, canary against stable, and the rollout's analysis.",
        panels,
    )


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard, exactly as committed."""
    boards = {"kdgate-executive": executive(), "kdgate-oncall": oncall(), "kdgate-debug": debug()}
    return {
        f"{name}.json": json.dumps(board, indent=2, ensure_ascii=False) + "\n"
        for name, board in boards.items()
    }


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT_DIR / name).write_text(text, encoding="utf-8")
        print(OUT_DIR / name)


if __name__ == "__main__":
    main()
