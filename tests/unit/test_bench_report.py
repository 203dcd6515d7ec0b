"""bench/report.py and bench/results.py: ratios, verdicts, medians and derived figures."""

from __future__ import annotations

import statistics

import pytest

from bench.report import COMPARISONS, Comparison, evaluate_all, ratio_lines, table, verdict
from bench.results import LoadResult, Phase, ScenarioResult, median_result


def _phase(requests: int, *, p50: float = 0.2, cpu: float = 1.0, busy: float = 1.5) -> Phase:
    load = LoadResult("wrk", requests, 10.0, 0, p50, 2 * p50, 3 * p50, 4 * p50)
    return Phase(load, 10.0, cpu, 0.5, busy, 2.5)


def _result(name: str, rps: float, p50: float = 0.2) -> ScenarioResult:
    result = ScenarioResult(name, name, "")
    result.phases["c16"] = _phase(round(rps * 10))
    result.phases["c1"] = _phase(1000, p50=p50)
    result.rss_kib = 100 * 1024
    return result


def test_phase_derived_figures() -> None:
    phase = _phase(5000, cpu=1.0, busy=1.5)
    assert phase.load.rps == 500
    assert phase.cpu_us_per_request == pytest.approx(1e6 * 1.0 / 5000)
    # The server used 1.0 s of the 1.5 busy seconds of its core in 10 s.
    assert phase.server_core_noise == pytest.approx(0.05)
    assert phase.client_core_noise == pytest.approx((2.5 - 0.5) / 10)
    unpinned = Phase(phase.load, 10.0, 1.0, 0.5, None, None)
    assert unpinned.server_core_noise is None
    assert unpinned.to_dict()["client_core_noise"] is None


def test_metric_keys() -> None:
    result = _result("kdgate", 7500)
    assert result.metric("c16.rps") == 7500
    assert result.metric("c1.p50_ms") == 0.2
    assert result.metric("rss_mib") == 100
    assert result.metric("rate.p95_ms") is None
    assert result.metric("c16.no_such_field") is None


@pytest.mark.parametrize(
    ("ratio", "at_least", "at_most", "expected"),
    [
        (0.75, 0.75, None, True),
        (0.7499, 0.75, None, False),
        (1.3, None, 1.3, True),
        (1.31, None, 1.3, False),
        (None, 2.0, None, False),
        (1.0, None, None, None),
        (None, None, None, None),
    ],
)
def test_verdict_bounds_are_inclusive(
    ratio: float | None, at_least: float | None, at_most: float | None, expected: bool | None
) -> None:
    assert verdict(ratio, at_least, at_most) is expected


def test_issue_targets_on_a_run_that_meets_two_and_misses_one() -> None:
    results = {
        "ceiling": _result("ceiling", 10000, p50=0.20),
        "naive": _result("naive", 4000),
        "kdgate": _result("kdgate", 7600, p50=0.27),
    }
    rows = {row["label"]: row for row in evaluate_all(COMPARISONS, results)}
    assert rows["kdgate / ceiling throughput (c16)"]["ratio"] == 0.76
    assert rows["kdgate / ceiling throughput (c16)"]["passed"] is True
    assert rows["kdgate / naive throughput (c16)"]["ratio"] == 1.9
    assert rows["kdgate / naive throughput (c16)"]["passed"] is False
    assert rows["kdgate / ceiling p50 (c1)"]["ratio"] == pytest.approx(1.35)
    assert rows["kdgate / ceiling p50 (c1)"]["passed"] is False
    # Shadow comparisons need scenarios that did not run: left out, not failed.
    assert not any(label.startswith("shadow") for label in rows)
    text = ratio_lines(list(rows.values()))
    assert "kdgate / ceiling throughput (c16): 0.760 (target >= 0.75: PASS)" in text
    assert "kdgate / naive throughput (c16): 1.900 (target >= 2: FAIL)" in text


def test_a_failed_scenario_fails_its_targets() -> None:
    broken = ScenarioResult("kdgate", "kdgate", "", error="RuntimeError: not ready")
    row = Comparison("x", "kdgate", "ceiling", "c16.rps", at_least=0.75).evaluate(
        {"kdgate": broken, "ceiling": _result("ceiling", 10000)}
    )
    assert row is not None
    assert (row["ratio"], row["passed"]) == (None, False)
    assert "error: RuntimeError: not ready" in table([broken])


def test_table_has_one_row_per_scenario_and_equal_columns() -> None:
    lines = table([_result("ceiling", 10000), _result("kdgate", 7600)]).splitlines()
    assert len(lines) == 4
    assert len({line.count("|") for line in lines}) == 1
    assert lines[2].startswith("| ceiling | 10000 |")


def test_median_result_takes_each_figure_s_median_and_skips_failed_repeats() -> None:
    runs = [_result("kdgate", rps) for rps in (7000, 9000, 7600)]
    runs.append(ScenarioResult("kdgate", "kdgate", "", error="boom"))
    merged = median_result(runs)
    assert merged.metric("c16.rps") == statistics.median([7000, 9000, 7600])
    assert merged.error is None
    assert "repeat failed: boom" in merged.notes


def test_worker_scaling_is_kdgate_speed_up_over_the_ceiling_speed_up() -> None:
    results = {
        "ceiling": _result("ceiling", 10000),
        "ceiling-2-workers": _result("ceiling-2-workers", 18000),
        "kdgate": _result("kdgate", 8000),
        "kdgate-2-workers": _result("kdgate-2-workers", 13600),
    }
    rows = {row["label"]: row for row in evaluate_all(COMPARISONS, results)}
    scaling = rows["kdgate 2-worker/1-worker / the ceiling's (c16)"]
    assert scaling["ratio"] == pytest.approx((13600 / 8000) / (18000 / 10000), abs=1e-3)
    assert scaling["passed"] is True  # 1.7x against the ceiling's 1.8x: 0.944
    results["kdgate-2-workers"] = _result("kdgate-2-workers", 12800)
    rows = {row["label"]: row for row in evaluate_all(COMPARISONS, results)}
    assert rows["kdgate 2-worker/1-worker / the ceiling's (c16)"]["passed"] is False  # 0.889
    del results["ceiling-2-workers"]
    labels = {row["label"] for row in evaluate_all(COMPARISONS, results)}
    assert "kdgate 2-worker/1-worker / the ceiling's (c16)" not in labels
