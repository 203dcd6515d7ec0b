"""Rollout test fixtures on pairs other than digits: the tabular pair (scikit-learn,
`probabilities` output) and the text pair (two INT64 inputs, logits).

    made = tabular_rollout(pairs, tmp_path)      # imported pair + a bad candidate's card
    config = write_rollout_config(tmp_path, made, webhook_url=..., secret=...)
    body = infer_rows(made.rows[:2], request_id="r-1")
    body = infer_inputs({name: array[:1] for name, array in made.inputs.items()}, "r-2")

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
    bad_card: Path | None
    inputs: dict[str, np.ndarray]  # the sample's inputs by name
    labels: np.ndarray
    model: str = MODEL

    @property
    def rows(self) -> np.ndarray:
        """The tabular sample's rows [N, 12] FP32."""
        return self.inputs[TABLE_INPUT]


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
    inputs, labels = _sample(pair)
    return RolloutPair(
        pair,
        good,
        good / "student.card.json",
        good / "teacher.card.json",
        bad / "student.card.json",
        inputs,
        labels,
    )


def text_rollout(pairs: PairCache, directory: Path) -> RolloutPair:
    """Import the text pair (input_ids + attention_mask) as model `text` into `directory`."""
    pair = pairs.get("text")
    out = directory / "text"
    import_pair(
        ImportRequest(
            teacher=pair.teacher, student=pair.student, name="text", out=out, sample=pair.sample
        )
    )
    inputs, labels = _sample(pair)
    card, teacher = out / "student.card.json", out / "teacher.card.json"
    return RolloutPair(pair, out, card, teacher, None, inputs, labels, model="text")


def _sample(pair: Pair) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(pair.sample) as sample:
        return {name: sample[name] for name in pair.inputs}, sample["labels"]


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
        "name": made.model,
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
    return infer_inputs({TABLE_INPUT: rows.astype(np.float32)}, request_id)


def infer_inputs(inputs: dict[str, np.ndarray], request_id: str) -> dict[str, Any]:
    """A V2 JSON request with every input by name (FP32 or INT64 arrays)."""
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return {
        "id": request_id,
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatypes[array.dtype],
                "data": array.ravel().tolist(),
            }
            for name, array in inputs.items()
        ],
    }
