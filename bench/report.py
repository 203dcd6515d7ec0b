"""Ratios between scenarios, checked against their targets, and the printed table.

A `Comparison` divides one scenario's figure by another's (same run) and, when it has a target,
says whether the ratio meets it. Comparisons whose scenarios were not run are left out, so
`--only` never reports a stale or half ratio.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.results import ScenarioResult


@dataclass(frozen=True)
class Comparison:
    """numerator.metric / denominator.metric, with an optional bound on the ratio."""

    label: str
    numerator: str  # scenario name
    denominator: str  # scenario name
    metric: str  # key understood by ScenarioResult.metric, e.g. "c16.rps"
    at_least: float | None = None
    at_most: float | None = None

    def evaluate(self, results: dict[str, ScenarioResult]) -> dict[str, Any] | None:
        """The ratio and its verdict, or None when either scenario or figure is missing."""
        top, bottom = results.get(self.numerator), results.get(self.denominator)
        if top is None or bottom is None:
            return None
        a, b = top.metric(self.metric), bottom.metric(self.metric)
        ratio = a / b if a is not None and b else None
        target = (
            f">= {self.at_least:g}"
            if self.at_least is not None
            else f"<= {self.at_most:g}"
            if self.at_most is not None
            else None
        )
        return {
            "label": self.label,
            "metric": self.metric,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "ratio": None if ratio is None else round(ratio, 3),
            "target": target,
            "passed": verdict(ratio, self.at_least, self.at_most),
        }


@dataclass(frozen=True)
class Scaling:
    """How much more a server does with more workers, relative to the ceiling doing the same:
    (scaled / single) / (ceiling_scaled / ceiling_single) of `metric`, with a lower bound."""

    label: str
    scaled: str
    single: str
    ceiling_scaled: str
    ceiling_single: str
    metric: str
    at_least: float

    def evaluate(self, results: dict[str, ScenarioResult]) -> dict[str, Any] | None:
        """The ratio of the two speed-ups and its verdict, or None when a scenario is missing."""
        names = (self.scaled, self.single, self.ceiling_scaled, self.ceiling_single)
        if any(name not in results for name in names):
            return None
        a, b, c, d = (results[name].metric(self.metric) for name in names)
        ratio = a / b / (c / d) if a is not None and b and c and d else None
        return {
            "label": self.label,
            "metric": self.metric,
            "numerator": f"{self.scaled}/{self.single}",
            "denominator": f"{self.ceiling_scaled}/{self.ceiling_single}",
            "ratio": None if ratio is None else round(ratio, 3),
            "target": f">= {self.at_least:g}",
            "passed": verdict(ratio, self.at_least, None),
        }


def verdict(ratio: float | None, at_least: float | None, at_most: float | None) -> bool | None:
    """True/False against the bounds; None when there is no bound. A missing ratio fails."""
    if at_least is None and at_most is None:
        return None
    if ratio is None:
        return False
    return (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)


# Issue 3's targets, then figures reported without a target.
COMPARISONS: tuple[Comparison | Scaling, ...] = (
    Comparison("kdgate / ceiling throughput (c16)", "kdgate", "ceiling", "c16.rps", at_least=0.75),
    # Issue 15: a second worker must scale kdgate about as well as it scales the ceiling.
    Scaling(
        "kdgate 2-worker/1-worker / the ceiling's (c16)",
        "kdgate-2-workers",
        "kdgate",
        "ceiling-2-workers",
        "ceiling",
        "c16.rps",
        at_least=0.9,
    ),
    Comparison("kdgate / naive throughput (c16)", "kdgate", "naive", "c16.rps", at_least=2.0),
    Comparison("kdgate / ceiling p50 (c1)", "kdgate", "ceiling", "c1.p50_ms", at_most=1.3),
    Comparison("kdgate / ceiling CPU per request", "kdgate", "ceiling", "c16.cpu_us_per_request"),
    Comparison("naive / ceiling CPU per request", "naive", "ceiling", "c16.cpu_us_per_request"),
    Comparison("kdgate / ceiling p95 (rate)", "kdgate", "ceiling", "rate.p95_ms"),
    # Issue 4 (run with --only kdgate,kdgate-shadow-...): shadow must cost the student little.
    Comparison(
        "shadow 10% local / off throughput",
        "kdgate-shadow-10-local",
        "kdgate",
        "c16.rps",
        at_least=0.9,
    ),
    *(
        Comparison(f"{label} / shadow off {metric}", name, "kdgate", metric, at_most=1.1)
        for name, label in (
            ("kdgate-shadow-100-slow-remote", "teacher 200 ms"),
            ("kdgate-shadow-100-teacher-down", "teacher down"),
        )
        for metric in ("rate.p50_ms", "rate.p95_ms")
    ),
    # Issue 14: a heavier student (the text pair), kdgate against the ceiling on the same model.
    *(
        Comparison(
            f"text {rows} kdgate / ceiling {label}", f"kdgate-{w}", f"ceiling-{w}", metric, **bound
        )
        for w, rows in (("text-b1", "batch 1"), ("text-b32", "batch 32"))
        for label, metric, bound in (
            ("throughput (c16)", "c16.rps", {"at_least": 0.75}),
            ("p50 (c1)", "c1.p50_ms", {}),
            ("CPU per request", "c16.cpu_us_per_request", {}),
        )
    ),
)


def evaluate_all(
    comparisons: Iterable[Comparison | Scaling], results: dict[str, ScenarioResult]
) -> list[dict[str, Any]]:
    """Every comparison whose two scenarios were run."""
    rows = (comparison.evaluate(results) for comparison in comparisons)
    return [row for row in rows if row is not None]


def _cell(result: ScenarioResult, key: str, digits: int) -> str:
    value = result.metric(key)
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("c16 req/s", "c16.rps", 0),
    ("c16 CPU us/req", "c16.cpu_us_per_request", 1),
    ("c16 noise server core", "c16.server_core_noise", 2),
    ("c16 noise client core", "c16.client_core_noise", 2),
    ("c1 p50 ms", "c1.p50_ms", 3),
    ("c1 p95 ms", "c1.p95_ms", 3),
    ("c1 p99 ms", "c1.p99_ms", 3),
    ("rate p50 ms", "rate.p50_ms", 3),
    ("rate p95 ms", "rate.p95_ms", 3),
    ("rate p99 ms", "rate.p99_ms", 3),
    ("rate failed", "rate.failed", 0),
    ("RSS MiB", "rss_mib", 1),
)


def table(results: Sequence[ScenarioResult]) -> str:
    """A Markdown table: one row per scenario, the COLUMNS figures."""
    header = ["scenario", *(title for title, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        if result.error:
            cells = [result.name, f"error: {result.error}"] + [""] * (len(COLUMNS) - 1)
        else:
            cells = [result.name, *(_cell(result, key, d) for _, key, d in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(rows: Sequence[dict[str, Any]]) -> str:
    """One line per comparison: ratio, target and PASS/FAIL (or 'info')."""
    out = []
    for row in rows:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
        if row["passed"] is None:
            status = "info"
        else:
            status = f"target {row['target']}: {'PASS' if row['passed'] else 'FAIL'}"
        out.append(f"- {row['label']}: {ratio} ({status})")
    return "\n".join(out)
