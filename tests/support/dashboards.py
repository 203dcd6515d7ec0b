"""Read the committed Grafana dashboards and yield every panel query as runnable PromQL.

Grafana substitutes template variables before a query reaches Prometheus; `panel_queries` does
the same, so a test can send each expression to a live Prometheus (`/api/v1/query`) and assert
that it parses and returns data:

    for query in panel_queries(model="digits", version="1"):
        result = prometheus.query(query.expr)   # must parse and be non-empty
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "dashboards" / "json"

# Grafana's built-in interval variables, at values that suit a Prometheus scraping every 1-15 s.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel; `expr` has every variable substituted."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    """File stem -> parsed dashboard JSON, for every `*.json` in `directory`."""
    return {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.json"))
    }


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_defaults(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """The current value of every template variable that has one (textbox, custom)."""
    defaults = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        value = variable.get("current", {}).get("value")
        if isinstance(value, str):
            defaults[variable["name"]] = value
    return defaults


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace `$name` and `${name}` as Grafana does; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def panel_queries(
    directory: Path = DASHBOARDS_DIR, *, model: str = "digits", version: str = "1", **values: str
) -> Iterator[PanelQuery]:
    """Every target of every panel of every dashboard, with variables substituted.

    `version` is a regex as Grafana renders a multi-value variable (`1`, or `(1|2)` for two).
    `values` overrides the built-ins and the dashboards' own variable defaults.
    """
    for name, dashboard in load_dashboards(directory).items():
        context = {
            **BUILTINS,
            **variable_defaults(dashboard),
            "model": model,
            "version": version,
            **values,
        }
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                yield PanelQuery(
                    dashboard=name,
                    panel=panel["title"],
                    ref_id=target["refId"],
                    expr=substitute(target["expr"], context),
                    instant=bool(target.get("instant")),
                )
