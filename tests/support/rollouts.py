"""Rollout test fixtures on the tabular pair (scikit-learn, `probabilities` output), not digits.

    made = tabular_rollout(pairs, tmp_path)      # imported pair + a bad candidate's card
    config = write_rollout_config(tmp_path, made, webhook_url=..., secret=...)
    body = infer_rows(made.rows[:2], request_id="r-1")

The bad candidate is the same logistic-regression student with its classes shifted by one
(coefficient rows and intercepts rotated): the same signature and the same confidence, but every
top-1 class moved, so its agreement with the teacher collapses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import helper

from kdgate.service.importer import ImportRequest, import_pair
from tests.support.pairs import TABLE_INPUT, Pair, PairCache

TOKEN = "kdgate-rollout-test-token-4b7e21"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tabular"
ROLLOUT = f"/admin/models/{MODEL}/rollout"
VERSIONS = f"/admin/models/{MODEL}/versions"
TRAFFIC = f"/admin/models/{MODEL}/traffic"
INFER = f"/v2/models/{MODEL}/infer"


@dataclass(frozen=True)
class RolloutPair:
    """The imported tabular pair (`directory` holds its cards) and a bad candidate's card."""

    pair: Pair
    directory: Path
    student_card: Path
    teacher_card: Path
    bad_card: Path
    rows: np.ndarray  # sample inputs [N, 12] FP32
    labels: np.ndarray


def shifted_classes(student: Path, out: Path) -> Path:
    """`student` (a skl2onnx LinearClassifier graph) with every class's coefficients and
    intercept moved to the next class."""
    model = onnx.load(str(student))
    (node,) = [n for n in model.graph.node if n.op_type == "LinearClassifier"]
    attributes = {a.name: a for a in node.attribute}
    intercepts = np.asarray(attributes["intercepts"].floats, np.float32)
    classes = len(intercepts)
    coefficients = np.asarray(attributes["coefficients"].floats, np.float32).reshape(classes, -1)
    rotated = {
        "coefficients": np.roll(coefficients, 1, axis=0).ravel().tolist(),
        "intercepts": np.roll(intercepts, 1).tolist(),
    }
    kept = [a for a in node.attribute if a.name not in rotated]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in rotated.items()])
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def tabular_rollout(pairs: PairCache, directory: Path) -> RolloutPair:
    """Import the tabular pair into `directory/pair` and the bad candidate into
    `directory/bad` (its own card, same teacher)."""
    pair = pairs.get("tabular")
    good = directory / "pair"
    import_pair(
        ImportRequest(
            teacher=pair.teacher, student=pair.student, name=MODEL, out=good, sample=pair.sample
        )
    )
    bad_onnx = shifted_classes(pair.student, directory / "bad-src" / "student.onnx")
    bad = directory / "bad"
    import_pair(
        ImportRequest(
            teacher=pair.teacher,
            student=bad_onnx,
            name=MODEL,
            out=bad,
            sample=pair.sample,
            output_kind="probabilities",
        )
    )
    with np.load(pair.sample) as sample:
        rows, labels = sample[TABLE_INPUT].astype(np.float32), sample["labels"]
    return RolloutPair(
        pair,
        good,
        good / "student.card.json",
        good / "teacher.card.json",
        bad / "student.card.json",
        rows,
        labels,
    )


def write_rollout_config(
    directory: Path,
    made: RolloutPair,
    *,
    webhook_url: str | None = None,
    secret: str | None = None,
    rollout: dict[str, Any] | None = None,
) -> Path:
    """v1 of the tabular pair, every request shadowed, the admin API on, no SLO breaches (the
    figures of these tests are the rollout's), drift off; `rollout`: `models[0].rollout`."""
    model: dict[str, Any] = {
        "name": MODEL,
        "students": [{"version": "1", "card": str(made.student_card)}],
        "teacher": {"card": str(made.teacher_card)},
        "traffic": {"shadow_fraction": 1.0},
    }
    if rollout is not None:
        model["rollout"] = rollout
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2},
        "models": [model],
        "slo": {"min_samples": 10**9},
        "drift": {"enabled": False},
        "admin": {"token": TOKEN, "state_dir": str(directory / "state")},
    }
    if webhook_url is not None:
        config["webhook"] = {
            "url": webhook_url,
            "secret": secret,
            "outbox_path": str(directory / "outbox.sqlite3"),
            "poll_seconds": 0.2,
            "backoff_base_seconds": 0.2,
            "backoff_cap_seconds": 1,
        }
    path = directory / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def infer_rows(rows: np.ndarray, request_id: str) -> dict[str, Any]:
    """A V2 JSON request for the tabular signature."""
    return {
        "id": request_id,
        "inputs": [
            {
                "name": TABLE_INPUT,
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ],
    }
