"""The committed Grafana dashboards: generated, well-formed, and querying only real kdgate series.

The metric contract is read from `monitoring.metrics.Metrics` and the request metrics themselves,
so a renamed metric or
label fails here, not as an empty panel in production. Grafana's own schema is checked by
tests/system/test_dashboard_schema.py; that every expression parses and returns data from a live
Prometheus is the full-stack system test's job (it uses tests/support/dashboards.py).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter as Multiset
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from kdgate.monitoring.metrics import CounterFamily, HistogramFamily, Metrics
from kdgate.monitoring.rules import DEFAULT_RUNBOOK_BASE, runbook_url
from kdgate.service.request_metrics import RequestMetrics
from kdgate.service.rollout_metrics import SERIES as ROLLOUT_SERIES
from tests.support.dashboards import (
    DASHBOARDS_DIR,
    iter_panels,
    load_dashboards,
    panel_queries,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "abs",
    "histogram_quantile", "or", "and", "unless", "on", "ignoring", "group_left", "bool",
}  # fmt: skip


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name kdgate exports -> its label names (`le` for histogram buckets)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    instruments = [*vars(Metrics(CollectorRegistry())).values(), *vars(RequestMetrics([])).values()]
    for instrument in instruments:
        if isinstance(instrument, MetricWrapperBase):
            # prometheus_client has no public accessor for a family's label names.
            found[instrument._name] = (str(instrument._type), tuple(instrument._labelnames))
        elif isinstance(instrument, CounterFamily):
            found[instrument.name] = ("counter", instrument.labelnames)
        elif isinstance(instrument, HistogramFamily):
            found[instrument.name] = ("histogram", instrument.labelnames)
    series: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in found.items():
        if kind == "counter":
            series[f"{name}_total"] = frozenset(labels)
        elif kind == "histogram":
            series[f"{name}_bucket"] = frozenset((*labels, "le"))
            series[f"{name}_sum"] = series[f"{name}_count"] = frozenset(labels)
        else:
            series[name] = frozenset(labels)
    # Gauges collected at scrape time from the rollouts (service/rollout_metrics.py).
    series.update({name: frozenset(labels) for name, (labels, _) in ROLLOUT_SERIES.items()})
    return series


SERIES = series_labels()
DASHBOARDS = load_dashboards()
EXPRS = [
    (name, panel["title"], target["expr"])
    for name, board in DASHBOARDS.items()
    for panel in iter_panels(board)
    for target in panel.get("targets", [])
]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dashboards_generate", DASHBOARDS_DIR.parent / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_series_contract_is_read_from_metrics_module() -> None:
    # Guards the introspection above: a broken read would make every later check vacuous.
    assert SERIES["kdgate_requests_total"] == {"model", "version", "protocol", "code"}
    assert SERIES["kdgate_fidelity_kl_divergence_nats_bucket"] == {"model", "version", "le"}
    assert SERIES["kdgate_calibration_correct_total"] == {"model", "version", "reference", "bin"}


def test_committed_json_is_what_the_generator_writes() -> None:
    rendered = load_generator().render()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARDS_DIR.glob("*.json")}
    assert on_disk == rendered, "dashboards/json is stale: run python dashboards/generate.py"


def test_three_dashboards_with_unique_uids() -> None:
    assert set(DASHBOARDS) == {"kdgate-executive", "kdgate-oncall", "kdgate-debug"}
    uids = [board["uid"] for board in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_well_formed(name: str) -> None:
    board = DASHBOARDS[name]
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in board, f"{name}: missing {key}"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in iter_panels(board)]
    assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids {ids}"

    occupied: Multiset[tuple[int, int]] = Multiset()
    for panel in iter_panels(board):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, f"{name}/{panel['title']}: wider than the grid"
        occupied.update(
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        )
    overlaps = [cell for cell, n in occupied.items() if n > 1]
    assert not overlaps, f"{name}: panels overlap at {overlaps[:5]}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_variables_datasource_model_version(name: str) -> None:
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var, query in (
        ("model", "label_values(kdgate_requests_total, model)"),
        ("version", 'label_values(kdgate_requests_total{model="$model"}, version)'),
    ):
        assert variables[var]["type"] == "query"
        assert variables[var]["datasource"] == DATASOURCE
        assert variables[var]["query"]["query"] == query


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_queries_the_datasource_variable(name: str) -> None:
    for panel in iter_panels(DASHBOARDS[name]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{name}/{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its `{...}` matcher) for every kdgate_ series in `expr`."""
    found = []
    for match in re.finditer(r"\b(kdgate_\w+)\s*(\{[^}]*\})?", expr):
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2) or ""))
        found.append((match.group(1), labels))
    return found


@pytest.mark.parametrize(("name", "title", "expr"), EXPRS)
def test_expr_uses_only_exported_series_and_labels(name: str, title: str, expr: str) -> None:
    used = selectors(expr)
    assert used, f"{name}/{title}: queries no kdgate series"
    known_labels: set[str] = set()
    for metric, labels in used:
        assert metric in SERIES, f"{name}/{title}: {metric} is not exported by kdgate"
        assert labels <= SERIES[metric], (
            f"{name}/{title}: {metric} has no {labels - SERIES[metric]}"
        )
        known_labels |= SERIES[metric]
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouping = {label.strip() for label in group.split(",") if label.strip()}
        assert grouping <= known_labels, f"{name}/{title}: groups by {grouping - known_labels}"
    depth = 0
    for char in expr:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, f"{name}/{title}: unbalanced parentheses"
    assert depth == 0, f"{name}/{title}: unbalanced parentheses"


def test_selector_parser_sees_a_misspelled_label() -> None:
    assert selectors('rate(kdgate_requests_total{modle="x",code=~"5.."}[1m])') == [
        ("kdgate_requests_total", {"modle", "code"})
    ]


def test_every_variable_in_a_query_has_a_value() -> None:
    queries = list(panel_queries(model="digits", version="(1|2)"))
    assert len(queries) == len(EXPRS)
    for query in queries:
        assert "$" not in query.expr, query
        for regex in re.findall(r'version=~"([^"]*)"', query.expr):
            assert regex in {"(1|2)", "(1|2)|teacher"}, query
    with pytest.raises(KeyError, match="undefined"):
        substitute("rate(x[$undefined])", {})


def test_every_runbook_is_a_panel_link_at_the_alerts_url() -> None:
    linked: dict[str, str] = {}
    for board in DASHBOARDS.values():
        for panel in iter_panels(board):
            for link in panel.get("links", []):
                assert link["targetBlank"] is True
                name = link["title"].removeprefix("Runbook: ")
                linked[name] = link["url"]
    runbooks = {path.stem for path in (ROOT / "docs/runbooks").glob("*.md")}
    assert set(linked) == runbooks, "every runbook is linked from the panel its alert concerns"
    for name, url in linked.items():
        # The same URL as the alerts' runbook_url annotation.
        assert url == runbook_url(DEFAULT_RUNBOOK_BASE, name)
    for board in DASHBOARDS.values():
        for panel in iter_panels(board):
            assert "docs/runbooks/" not in panel.get("description", ""), panel["title"]


def test_provisioning_points_grafana_at_the_dashboards() -> None:
    provisioning = DASHBOARDS_DIR.parent / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    providers = yaml.safe_load((provisioning / "dashboards" / "kdgate.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./dashboards/json:{provider['options']['path']}:ro" in mounts
