"""docs/traffic.md's curl examples run, in order, against a real server with the admin API on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.test_readme import MARKER, readme_examples, run_examples
from tests.support.live_server import REPO, live_server
from tests.support.traffic import AUTH, TOKEN, extra_student, write_admin_config

pytestmark = pytest.mark.integration


def test_traffic_doc_examples_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_examples((REPO / "docs" / "traffic.md").read_text())
    assert len(blocks) >= 5, f"docs/traffic.md lost its {MARKER} ```bash blocks"
    assert any("/admin/" in block for block in blocks)
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("CANARY_CARD", str(extra_student(tmp_path, "2", seed=2)))
    with live_server(write_admin_config(tmp_path, {"1": 100})) as server:
        run_examples(blocks, server)
        # The walk-through ends with version 2 promoted and version 1 retired.
        traffic = httpx.get(f"{server.url}/admin/models/digits/traffic", headers=AUTH).json()
        assert traffic["weights"] == {"2": 100}
