"""bench/ab.py: two kdgate trees and the ceiling, measured in paired rounds (real servers, wrk)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ab, wrk

REPO = Path(__file__).resolve().parents[2]


def test_rounds_alternate_the_order_and_ratios_pair_rounds() -> None:
    assert ab.order(["base", "this", "ceiling"], 0) == ["base", "this", "ceiling"]
    assert ab.order(["base", "this", "ceiling"], 1) == ["ceiling", "this", "base"]
    assert ab.paired([10.0, 30.0], [5.0, 10.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        ab.paired([1.0], [1.0, 2.0])


@pytest.mark.integration
def test_a_tree_against_itself_reports_every_paired_ratio() -> None:
    if wrk.find() is None:
        pytest.fail("wrk is missing: `make sysdeps` installs it")
    command = [sys.executable, "-m", "bench.ab", "--base", str(REPO)]
    done = subprocess.run(
        [*command, "--rounds", "2", "--seconds", "1", "--warmup", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    labels = ("this/base CPU per request", "base/ceiling throughput", "this/ceiling throughput")
    for label in labels:
        found = re.search(rf"{re.escape(label)}: median (\S+) \(rounds: (\S+) (\S+)\)", done.stdout)
        assert found is not None, done.stdout
        assert all(float(value) > 0 for value in found.groups())
