"""Shared test policy.

- Every test runs with a clean `KDGATE_*` environment (a developer's shell cannot leak in).
- Integration and system tests need real binaries and sockets. Where those are missing they skip,
  except when `KDGATE_REQUIRE_SYSTEM_TESTS=1` or `CI=true`: there a skip is reported as a failure,
  so CI can never go green by skipping the tests that matter.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.pairs import PairCache

REQUIRED_MARKERS = ("integration", "system")


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> PairCache:
    """The four pair families of tests/support/pairs.py, each built once per session."""
    from tests.support.pairs import PairCache  # onnx and torch: only for the tests that use it

    return PairCache(tmp_path_factory.mktemp("pairs"))


def system_tests_required() -> bool:
    return os.environ.get("KDGATE_REQUIRE_SYSTEM_TESTS") == "1" or (
        os.environ.get("CI", "").lower() == "true"
    )


@pytest.fixture(autouse=True)
def _clean_kdgate_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("KDGATE_") and key != "KDGATE_REQUIRE_SYSTEM_TESTS":
            monkeypatch.delenv(key)
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and system_tests_required()
        and any(item.get_closest_marker(m) for m in REQUIRED_MARKERS)
    ):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"system test skipped where it must run: {reason}"
    return report
