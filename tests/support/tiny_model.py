"""A tiny digits-shaped student built with `onnx.helper`, with its model card.

A 64 -> 16 -> 10 MLP with fixed random weights: input "input" FP32 [-1, 64], output "logits"
FP32 [-1, 10], the same signature as the committed models/digits pair, so tests do not depend
on the distillation pipeline having run. `reference_logits` recomputes the same maths in numpy,
an independent reference for what the server returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kdgate.service.cards import ModelCard, TensorSpec, sha256_file, write_card

HIDDEN = 16


@dataclass(frozen=True)
class TinyWeights:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


def tiny_weights(seed: int = 0) -> TinyWeights:
    rng = np.random.default_rng(seed)
    return TinyWeights(
        w1=rng.normal(0, 0.1, (64, HIDDEN)).astype(np.float32),
        b1=rng.normal(0, 0.1, HIDDEN).astype(np.float32),
        w2=rng.normal(0, 0.1, (HIDDEN, 10)).astype(np.float32),
        b2=rng.normal(0, 0.1, 10).astype(np.float32),
    )


def reference_logits(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The tiny model's output computed with numpy (float32 throughout)."""
    w = tiny_weights(seed)
    hidden = np.maximum(x.astype(np.float32) @ w.w1 + w.b1, 0)
    return (hidden @ w.w2 + w.b2).astype(np.float32)


def tiny_model(seed: int = 0) -> onnx.ModelProto:
    w = tiny_weights(seed)
    inits = [
        numpy_helper.from_array(w.w1, "w1"),
        numpy_helper.from_array(w.b1, "b1"),
        numpy_helper.from_array(w.w2, "w2"),
        numpy_helper.from_array(w.b2, "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_student",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_student(directory: Path, version: str = "1", seed: int = 0) -> Path:
    """Write `student-v{version}.onnx` and its card into `directory`; returns the card path."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / f"student-v{version}.onnx"
    onnx.save(tiny_model(seed), onnx_path)
    card = ModelCard(
        name="digits",
        role="student",
        version=version,
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        bytes=onnx_path.stat().st_size,
        parameters=64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        class_labels=[str(i) for i in range(10)],
    )
    card_path = directory / f"student-v{version}.card.json"
    write_card(card_path, card)
    return card_path


def write_config(directory: Path, versions: dict[str, int] | None = None, **server: object) -> Path:
    """A kdgate YAML config serving tiny students (relative card paths) from `directory`."""
    import yaml

    versions = versions or {"1": 100}
    students = []
    for index, version in enumerate(versions):
        write_tiny_student(directory / "models", version, seed=index)
        students.append({"version": version, "card": f"models/student-v{version}.card.json"})
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2, **server},
        "models": [{"name": "digits", "students": students, "traffic": {"weights": versions}}],
    }
    path = directory / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
