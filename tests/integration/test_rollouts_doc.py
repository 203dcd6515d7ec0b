"""docs/rollouts.md's walk-through runs, in order, against a real server under live traffic.

A rollout is judged on shadowed requests, so a client thread sends digits requests for the whole
walk-through. The candidate is the committed digits student under version 2: it agrees with the
incumbent row for row, so every check passes once a step has its samples and the walk-through
ends in a promotion, whatever the machine's speed (up to the doc's own deadlines).
"""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from kdgate.service.cards import load_card, write_card
from tests.integration.test_readme import MARKER, readme_examples, run_examples
from tests.support.answers import versions_answering
from tests.support.live_server import REPO, LiveServer, live_server
from tests.support.traffic import AUTH, TOKEN, extra_student
from tests.support.v2 import json_request

pytestmark = pytest.mark.integration

DIGITS = REPO / "models" / "digits"
RATE = 40  # requests per second, one row each: 100 paired rows in about 2.5 s


def write_config(directory: Path) -> Path:
    """v1 of digits with its local teacher, every request shadowed, the admin API on."""
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2},
        "models": [
            {
                "name": "digits",
                "students": [{"version": "1", "card": str(DIGITS / "student-v1.card.json")}],
                "teacher": {"card": str(DIGITS / "teacher.card.json")},
                "traffic": {"weights": {"1": 100}, "shadow_fraction": 1.0},
            }
        ],
        "admin": {"token": TOKEN, "state_dir": str(directory / "state")},
    }
    path = directory / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def candidate_card(directory: Path) -> Path:
    """The committed student v1's ONNX under a card of version 2: as good as the incumbent."""
    directory.mkdir(parents=True)
    shutil.copyfile(DIGITS / "student-v1.onnx", directory / "student-v2.onnx")
    card = load_card(DIGITS / "student-v1.card.json")
    path = directory / "student-v2.card.json"
    write_card(path, card.model_copy(update={"version": "2", "file": "student-v2.onnx"}))
    return path


def clients(server: LiveServer) -> AbstractContextManager[list[str]]:
    """One-row digits requests at about RATE per second: versions_answering's."""
    with np.load(DIGITS / "reference.npz") as reference:
        rows = reference["inputs"]
    return versions_answering(
        server.url,
        "/v2/models/digits/infer",
        lambda n: json_request(rows[n % len(rows)][None, :]),
        rate=RATE,
    )


def admin_get(server: LiveServer, path: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/admin/models/digits/{path}", headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_rollouts_doc_walk_through_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_examples((REPO / "docs" / "rollouts.md").read_text())
    assert len(blocks) >= 6, f"docs/rollouts.md lost its {MARKER} ```bash blocks"
    # The last block is the abort aside, on another candidate: the promotion is checked before.
    *walk, aside = blocks
    assert "/rollout/abort" in aside and all("/rollout/abort" not in b for b in walk)
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("CANDIDATE_CARD", str(candidate_card(tmp_path / "candidate")))
    monkeypatch.setenv("SECOND_CARD", str(extra_student(tmp_path, "3", seed=3)))
    with live_server(write_config(tmp_path)) as server, clients(server) as versions:
        run_examples(walk, server)
        rollout = admin_get(server, "rollout")
        assert (rollout["candidate"], rollout["state"]) == ("2", "promoted"), rollout
        assert rollout["weights"] == {"1": 0, "2": 100}
        assert set(versions) == {"1", "2"}  # the 50 % step served both
        run_examples([aside], server)
        rollout = admin_get(server, "rollout")
        assert (rollout["candidate"], rollout["state"]) == ("3", "aborted"), rollout
        assert admin_get(server, "traffic")["weights"] == {"1": 0, "2": 100, "3": 0}
