"""A tiny text-classifier-like pair built with `onnx.helper`: two INT64 inputs, any output kind.

    input_ids [N, L] INT64, attention_mask [N, L] INT64
      -> Gather(embedding [V, E]) -> masked mean over L -> MatMul [E, C] + bias -> scores [N, C]
      (+ Softmax when the card's kind is "probabilities")

Weights come from a seed, so a student and a teacher are two seeds (or one seed with noise
`student_noise`, for a student that mostly follows its teacher). `reference_scores` recomputes
the graph in numpy, an independent reference for kdgate's figures. `write_model` writes the ONNX
file and its model card; input names can be changed (a teacher that calls its inputs otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kdgate.service.cards import ModelCard, TensorSpec, sha256_file, write_card

VOCAB = 50
EMBED = 8
LENGTH = 6


@dataclass(frozen=True)
class TextWeights:
    embedding: np.ndarray  # [V, E]
    w: np.ndarray  # [E, C]
    b: np.ndarray  # [C]


def text_weights(seed: int, classes: int, *, noise_of: int | None = None) -> TextWeights:
    """Weights of seed `seed`; with `noise_of`, those of seed `noise_of` plus a little noise."""
    rng = np.random.default_rng(seed)
    if noise_of is not None:
        base = text_weights(noise_of, classes)
        return TextWeights(
            (base.embedding + rng.normal(0, 0.3, base.embedding.shape)).astype(np.float32),
            (base.w + rng.normal(0, 0.3, base.w.shape)).astype(np.float32),
            (base.b + rng.normal(0, 0.3, base.b.shape)).astype(np.float32),
        )
    return TextWeights(
        rng.normal(0, 1.0, (VOCAB, EMBED)).astype(np.float32),
        rng.normal(0, 1.0, (EMBED, classes)).astype(np.float32),
        rng.normal(0, 0.5, classes).astype(np.float32),
    )


def reference_scores(weights: TextWeights, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The graph's raw scores (before any Softmax), in float64 numpy."""
    emb = weights.embedding.astype(np.float64)[ids]  # [N, L, E]
    m = mask.astype(np.float64)[..., None]
    mean = (emb * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    return mean @ weights.w.astype(np.float64) + weights.b.astype(np.float64)


def text_model(
    weights: TextWeights,
    *,
    softmax: bool = False,
    ids_name: str = "input_ids",
    mask_name: str = "attention_mask",
    output_name: str = "logits",
) -> onnx.ModelProto:
    classes = weights.w.shape[1]
    raw = "raw" if softmax else output_name
    nodes = [
        helper.make_node("Gather", ["embedding", ids_name], ["emb"], axis=0),
        helper.make_node("Cast", [mask_name], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], [raw]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", [raw], [output_name], axis=1))
    inits = [
        numpy_helper.from_array(weights.embedding, "embedding"),
        numpy_helper.from_array(weights.w, "w"),
        numpy_helper.from_array(weights.b, "b"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "text",
        [
            helper.make_tensor_value_info(ids_name, TensorProto.INT64, ["batch", LENGTH]),
            helper.make_tensor_value_info(mask_name, TensorProto.INT64, ["batch", LENGTH]),
        ],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_model(
    directory: Path,
    stem: str,
    weights: TextWeights,
    *,
    role: str = "student",
    kind: str = "logits",
    ids_name: str = "input_ids",
    mask_name: str = "attention_mask",
    output_name: str | None = None,
    name: str = "text",
) -> Path:
    """Write `<stem>.onnx` and `<stem>.card.json` into `directory`; returns the card path.

    `kind` "probabilities" appends a Softmax node; "regression" needs one output column.
    """
    directory.mkdir(parents=True, exist_ok=True)
    output = output_name or {"logits": "logits", "probabilities": "probabilities"}.get(
        kind, "prediction"
    )
    model = text_model(
        weights,
        softmax=kind == "probabilities",
        ids_name=ids_name,
        mask_name=mask_name,
        output_name=output,
    )
    path = directory / f"{stem}.onnx"
    onnx.save(model, path)
    classes = weights.w.shape[1]
    card = ModelCard(
        name=name,
        role=role,  # type: ignore[arg-type]
        version="1",
        file=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        inputs=[
            TensorSpec(name=ids_name, datatype="INT64", shape=[-1, LENGTH]),
            TensorSpec(name=mask_name, datatype="INT64", shape=[-1, LENGTH]),
        ],
        outputs=[TensorSpec(name=output, datatype="FP32", shape=[-1, classes])],
        output_kind=kind,  # type: ignore[arg-type]
        class_labels=[] if kind == "regression" else [f"c{i}" for i in range(classes)],
    )
    card_path = directory / f"{stem}.card.json"
    write_card(card_path, card)
    return card_path


def token_batch(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [rows, L] and a mask [rows, L] of 1s then 0s (at least one 1 per row)."""
    ids = rng.integers(0, VOCAB, (rows, LENGTH)).astype(np.int64)
    lengths = rng.integers(1, LENGTH + 1, rows)
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask


TEACHER_SEED = 1
STUDENT_SEED = 7
CLASSES = 4


@dataclass(frozen=True)
class Pair:
    """A student and teacher card written by `write_pair`, and the weights behind them."""

    student: Path
    teacher: Path
    student_weights: TextWeights
    teacher_weights: TextWeights


def write_pair(
    directory: Path,
    *,
    student_kind: str = "logits",
    teacher_kind: str = "logits",
    teacher_names: tuple[str, str] = ("input_ids", "attention_mask"),
    classes: int = CLASSES,
    teacher_classes: int | None = None,
) -> Pair:
    """A student that mostly follows its teacher (the teacher's weights plus noise)."""
    teacher_weights = text_weights(TEACHER_SEED, teacher_classes or classes)
    student_weights = text_weights(STUDENT_SEED, classes, noise_of=TEACHER_SEED)
    ids_name, mask_name = teacher_names
    return Pair(
        student=write_model(directory, "student", student_weights, kind=student_kind),
        teacher=write_model(
            directory,
            "teacher",
            teacher_weights,
            role="teacher",
            kind=teacher_kind,
            ids_name=ids_name,
            mask_name=mask_name,
        ),
        student_weights=student_weights,
        teacher_weights=teacher_weights,
    )


def v2_text_body(request_id: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, object]:
    """A V2 JSON request with both INT64 inputs."""
    return {
        "id": request_id,
        "inputs": [
            {
                "name": "input_ids",
                "shape": list(ids.shape),
                "datatype": "INT64",
                "data": ids.ravel().tolist(),
            },
            {
                "name": "attention_mask",
                "shape": list(mask.shape),
                "datatype": "INT64",
                "data": mask.ravel().tolist(),
            },
        ],
    }
