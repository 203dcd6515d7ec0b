"""Prometheus recording and alerting rules rendered from the SLO config (`kdgate rules`).

    rules = render_rules(settings.slo, {"digits": objectives_for(card.metrics, settings.slo)})
    write_rules(rules, Path("deploy/prometheus/rules"))   # -> kdgate-slo.rules.yml

Event-ratio SLOs (agreement, latency) get multi-window multi-burn-rate alerts (SRE workbook,
chapter 5): with error budget `b = 1 - target`, page when the error ratio exceeds 14.4 b over 1h
AND 5m, or 6 b over 6h AND 30m; ticket at 1 b over 3d AND 6h.

- agreement: bad events are compared pairs whose top-1 differs (`samples - agreements`);
  target = `agreement_min`.
- latency: bad events are requests slower than the objective, read from the duration histogram
  bucket `le` = the largest `LATENCY_BUCKETS_SECONDS` bound <= the objective (exact for the 100 ms
  default; otherwise slightly strict, never lenient). Target 0.95, because the objective is a P95.

Mean KL, ECE (vs teacher, and vs labels for student versions) and drift share get windowed
threshold alerts over `window_seconds`, guarded by `min_samples`, with `for` and
`keep_firing_for` = `consecutive_breaches x evaluate_every_seconds`: the in-process monitor's
hysteresis. Every alert has `severity` (page | ticket), `slo`, `model` and `version` (drift is
per model), and annotations `summary`, `description`, `runbook_url`, `observed`, `objective`.

`runbook_url` is a link, `<runbook base>/<runbook>.md`: Alertmanager receivers and Grafana render
it as one, so a repository path would be a dead link. The base defaults to
`DEFAULT_RUNBOOK_BASE`, a gateway's own `GET /runbooks` (service/runbooks.py) where `make stack`
and docker compose publish it; `kdgate rules --runbook-base URL` points it at the gateway's
external URL or your own copy (a wiki, an internal Git host).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS
from kdgate.monitoring.recorder import TEACHER_VERSION
from kdgate.monitoring.slo import Objective, SloConfig, objectives_for
from kdgate.monitoring.slo_monitor import le_label

RULES_FILE = "kdgate-slo.rules.yml"
# The gateway serves its runbooks; `make stack` and docker compose publish it on localhost:8000.
DEFAULT_RUNBOOK_BASE = "http://localhost:8000/runbooks"
LATENCY_TARGET = 0.95  # the latency objective is a P95: 5 % of requests may be slower
BURN_WINDOWS = ("5m", "30m", "1h", "6h", "3d")
# severity -> (burn factor, long window, short window) pairs that fire it (either pair), and `for`.
# The SRE workbook's table: the two fast windows page (2 % and 5 % of a 30-day budget spent), the
# slow one tickets (10 %). The hand-written availability rules use the same table (a test checks).
BURN_ALERTS = {
    "page": (((14.4, "1h", "5m"), (6.0, "6h", "30m")), "2m"),
    "ticket": (((1.0, "3d", "6h"),), "15m"),
}
RUNBOOKS = {
    "agreement": "agreement-drop",
    "p95_latency": "latency",
    "kl_mean": "kl",
    "ece_teacher": "calibration",
    "ece_label": "calibration",
    "drift_share": "input-drift",
}
BY = "by (model, version)"


def duration(seconds: float) -> str:
    """A Prometheus duration for whole `seconds`, in the largest exact unit: 300 -> "5m"."""
    total = round(seconds)
    if total <= 0:
        raise ValueError(f"a rule window must be at least 1 s, got {seconds}")
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total % size == 0:
            return f"{total // size}{unit}"
    return f"{total}s"


def check_runbook_base(url: str) -> str:
    """`url` checked to be an absolute http(s) link, returned without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the runbook base must be an http(s) URL, got {url!r}")
    return url.rstrip("/")


def runbook_url(base: str, runbook: str) -> str:
    """The link to runbook `<runbook>.md` (docs/runbooks) under `base` (`check_runbook_base`)."""
    return f"{check_runbook_base(base)}/{runbook}.md"


def latency_bucket(objective_seconds: float) -> float:
    """The histogram bound that stands for `objective_seconds` (largest bound <= objective)."""
    below = [b for b in LATENCY_BUCKETS_SECONDS if b <= objective_seconds * (1 + 1e-9)]
    return below[-1] if below else LATENCY_BUCKETS_SECONDS[0]


def _recording_rules(les: Sequence[str], window: str) -> list[dict[str, str]]:
    rules = []
    for w in BURN_WINDOWS:
        rules.append(
            {
                "record": f"model_version:kdgate_fidelity_disagreement:ratio_rate{w}",
                "expr": f"1 - sum {BY} (rate(kdgate_fidelity_agreements_total[{w}]))\n"
                f"  / sum {BY} (rate(kdgate_fidelity_samples_total[{w}]))",
            }
        )
        for le in les:
            rules.append(
                {
                    "record": f"model_version_le:kdgate_request_slow:ratio_rate{w}",
                    "expr": f"1 - sum by (model, version, le)"
                    f' (rate(kdgate_request_duration_seconds_bucket{{le="{le}"}}[{w}]))\n'
                    f"  / ignoring (le) group_left"
                    f" sum {BY} (rate(kdgate_request_duration_seconds_count[{w}]))",
                }
            )
    rules.append(
        {
            "record": f"model_version:kdgate_fidelity_samples:increase{window}",
            "expr": f"sum {BY} (increase(kdgate_fidelity_samples_total[{window}]))",
        }
    )
    rules.append(
        {
            "record": f"model_version:kdgate_request_duration_seconds_count:increase{window}",
            "expr": f"sum {BY} (increase(kdgate_request_duration_seconds_count[{window}]))",
        }
    )
    rules.append(
        {
            "record": f"model_version:kdgate_fidelity_kl_divergence_nats:mean{window}",
            "expr": f"sum {BY} (rate(kdgate_fidelity_kl_divergence_nats_sum[{window}]))\n"
            f"  / sum {BY} (rate(kdgate_fidelity_kl_divergence_nats_count[{window}]))",
        }
    )
    by_ref = "by (model, version, reference)"
    rules.append(
        {
            "record": f"model_version_reference:kdgate_calibration_samples:increase{window}",
            "expr": f"sum {by_ref} (increase(kdgate_calibration_samples_total[{window}]))",
        }
    )
    # ECE = sum over bins |correct - confidence| / samples (DESIGN.md), over the window.
    by_bin = "by (model, version, reference, bin)"
    rules.append(
        {
            "record": f"model_version_reference:kdgate_calibration_ece:ratio{window}",
            "expr": f"sum {by_ref} (abs(\n"
            f"    sum {by_bin} (increase(kdgate_calibration_correct_total[{window}]))\n"
            f"  - sum {by_bin} (increase(kdgate_calibration_confidence_total[{window}]))\n"
            f"))\n  / sum {by_ref} (increase(kdgate_calibration_samples_total[{window}]))",
        }
    )
    return rules


def _annotations(
    slo: str, summary: str, description: str, objective: float, window_seconds: float, base: str
) -> dict[str, str]:
    return {
        "summary": summary,
        "description": description,
        "runbook_url": runbook_url(base, RUNBOOKS[slo]),
        "observed": "{{ $value }}",
        "objective": f"{objective:g}",
        "window_seconds": f"{window_seconds:g}",
    }


def _burn_alerts(
    model: str, objective: Objective, config: SloConfig, base: str
) -> list[dict[str, Any]]:
    if objective.slo == "agreement":
        budget = 1.0 - objective.objective
        series, name = "model_version:kdgate_fidelity_disagreement:ratio_rate", "KdgateAgreement"
        selector = f'{{model="{model}"}}'
        guard = "model_version:kdgate_fidelity_samples:increase"
        what = f"top-1 agreement with the teacher (objective >= {objective.objective:g})"
    else:
        budget = 1.0 - LATENCY_TARGET
        series, name = "model_version_le:kdgate_request_slow:ratio_rate", "KdgateLatency"
        le = le_label(latency_bucket(objective.objective))
        selector = f'{{model="{model}", le="{le}"}}'
        guard = "model_version:kdgate_request_duration_seconds_count:increase"
        what = f"requests slower than {le} s (objective: P95 <= {objective.objective:g} s)"
    if budget <= 0:
        return []  # a 100 % target has no budget to burn; the threshold monitor still applies
    window = duration(config.window_seconds)
    alerts = []
    for severity, (pairs, hold) in BURN_ALERTS.items():
        conditions = [
            f"(\n  {series}{long}{selector} > {factor * budget:.6g}\n"
            f"  and {series}{short}{selector} > {factor * budget:.6g}\n)"
            for factor, long, short in pairs
        ]
        expr = (
            "(\n" + "\nor\n".join(conditions) + "\n)\n"
            f'and on (model, version) {guard}{window}{{model="{model}"}} >= {objective.min_samples}'
        )
        windows = " or ".join(f"{f:g}x over {lw} and {sw}" for f, lw, sw in pairs)
        alerts.append(
            {
                "alert": f"{name}BudgetBurn",
                "expr": expr,
                "for": hold,
                "labels": {"severity": severity, "slo": objective.slo},
                "annotations": _annotations(
                    objective.slo,
                    f"{{{{ $labels.model }}}} v{{{{ $labels.version }}}}: {objective.slo} error "
                    f"budget burning ({windows})",
                    f"Bad-event ratio of {what} is {{{{ $value | humanizePercentage }}}}; the "
                    f"error budget is {budget:.4g} ({severity}: {windows}).",
                    objective.objective,
                    config.window_seconds,
                    base,
                ),
            }
        )
    return alerts


def _threshold_alert(
    model: str, objective: Objective, config: SloConfig, base: str
) -> dict[str, Any]:
    w = duration(config.window_seconds)
    m = f'model="{model}"'
    if objective.slo == "kl_mean":
        name, value = (
            "KdgateKLDivergenceHigh",
            f"model_version:kdgate_fidelity_kl_divergence_nats:mean{w}{{{m}}}",
        )
        guard = f"model_version:kdgate_fidelity_samples:increase{w}{{{m}}}"
        what = "mean KL(teacher || student), nats"
    elif objective.slo in ("ece_teacher", "ece_label"):
        reference = "teacher" if objective.slo == "ece_teacher" else "label"
        sel = f'{m}, reference="{reference}", version!="{TEACHER_VERSION}"'
        name = "KdgateCalibrationErrorHigh"
        value = f"model_version_reference:kdgate_calibration_ece:ratio{w}{{{sel}}}"
        guard = f"model_version_reference:kdgate_calibration_samples:increase{w}{{{sel}}}"
        what = f"ECE of the student against the {reference}"
    else:
        name, value = "KdgateInputDrift", f"max by (model) (kdgate_input_drift_share{{{m}}})"
        guard = f"sum by (model) (increase(kdgate_requests_total{{{m}}}[{w}]))"
        what = "share of input columns drifted from the reference sample"
    on = "on (model)" if objective.slo == "drift_share" else "on (model, version)"
    hold = duration(config.consecutive_breaches * config.evaluate_every_seconds)
    return {
        "alert": name,
        "expr": f"{value} > {objective.objective:.6g}\nand {on} {guard} >= {objective.min_samples}",
        "for": hold,
        "keep_firing_for": hold,
        "labels": {"severity": "ticket", "slo": objective.slo},
        "annotations": _annotations(
            objective.slo,
            f"{{{{ $labels.model }}}}: {what} above {objective.objective:g}",
            f"{what} is {{{{ $value }}}} over {w} (objective <= {objective.objective:g}, "
            f"from {objective.source}).",
            objective.objective,
            config.window_seconds,
            base,
        ),
    }


def render_rules(
    slo_config: SloConfig,
    models: Sequence[str] | Mapping[str, Sequence[Objective]],
    *,
    runbook_base: str = DEFAULT_RUNBOOK_BASE,
) -> dict[str, Any]:
    """The rules file as a dict (dump with `yaml.safe_dump`): a recording and an alerting group.

    `runbook_base`: an http(s) URL; each alert links `<runbook_base>/<runbook>.md`.

    `models`: names (objectives from the config alone) or name -> objectives (e.g. card-derived,
    so the rules use the same objectives as the in-process monitor).
    """
    per_model = (
        {name: list(objs) for name, objs in models.items()}
        if isinstance(models, Mapping)
        else {name: objectives_for(None, slo_config, name) for name in models}
    )
    les = sorted(
        {
            le_label(latency_bucket(o.objective))
            for objs in per_model.values()
            for o in objs
            if o.slo == "p95_latency"
        },
        key=float,
    )
    alerts: list[dict[str, Any]] = []
    for model, objectives in per_model.items():
        for objective in objectives:
            if objective.slo in ("agreement", "p95_latency"):
                alerts += _burn_alerts(model, objective, slo_config, runbook_base)
            else:
                alerts.append(_threshold_alert(model, objective, slo_config, runbook_base))
    return {
        "groups": [
            {
                "name": "kdgate-slo-recording",
                "rules": _recording_rules(les, duration(slo_config.window_seconds)),
            },
            {"name": "kdgate-slo-alerts", "rules": alerts},
        ]
    }


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as `|` blocks, so the file reads like hand-written rules."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def dump_rules(rules: Mapping[str, Any]) -> str:
    """YAML text of a rules dict, with a do-not-edit header."""
    header = "# Generated by `kdgate rules` from the slo: config. Do not edit; re-render.\n"
    return header + yaml.dump(dict(rules), Dumper=_LiteralDumper, sort_keys=False, width=100)


def write_rules(rules: Mapping[str, Any], out_dir: Path | str) -> Path:
    """Write `kdgate-slo.rules.yml` into `out_dir` (created); returns the file path."""
    path = Path(out_dir) / RULES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_rules(rules))
    tmp.replace(path)
    return path


def main_rules(
    argv: Sequence[str] | None,
    slo_config: SloConfig,
    models: Sequence[str] | Mapping[str, Sequence[Objective]],
) -> int:
    """`kdgate rules [--out DIR | --stdout] [--runbook-base URL]` after the caller loaded the
    config (`--config`)."""
    parser = argparse.ArgumentParser(prog="kdgate rules", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="deploy/prometheus/rules", help="output directory")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    parser.add_argument(
        "--runbook-base",
        default=DEFAULT_RUNBOOK_BASE,
        metavar="URL",
        help=f"runbook_url of each alert is URL/<runbook>.md (default: {DEFAULT_RUNBOOK_BASE})",
    )
    args, _ = parser.parse_known_args(argv)  # --config belongs to the caller
    try:
        base = check_runbook_base(args.runbook_base)
    except ValueError as exc:
        parser.error(str(exc))
    rules = render_rules(slo_config, models, runbook_base=base)
    if args.stdout:
        print(dump_rules(rules), end="")
    else:
        print(write_rules(rules, args.out))
    return 0
