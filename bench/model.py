"""The model pair and the payload every benchmarked server gets.

The default pair is `models/digits/` (student-v1 and teacher cards). Until those files exist,
`resolve_models` builds stand-ins with the same signature (input "input" FP32 [-1, 64], output
"logits" FP32 [-1, 10]): a 64->64->10 MLP student and a 64->256->256->10 MLP teacher, each with a
model card, so kdgate can load them exactly as it loads the real pair.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdgate.service.cards import (
    ModelCard,
    TensorSpec,
    load_card,
    model_path,
    sha256_file,
    write_card,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models" / "digits"
N_FEATURES = 64
N_CLASSES = 10


@dataclass(frozen=True)
class ModelFiles:
    """A model card and the ONNX file it names."""

    card: Path
    onnx: Path
    standin: bool


def session(onnx_path: Path) -> Any:
    """An onnxruntime session with the options all three servers share: one thread, sequential.

    One thread because the server is pinned to one core; more threads would only contend.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def resolve_models(workdir: Path) -> tuple[ModelFiles, ModelFiles]:
    """(student, teacher): the default pair where present, else stand-ins written to `workdir`."""
    return (
        _card_or_standin(MODELS_DIR / "student-v1.card.json", "student", (64,), workdir),
        _card_or_standin(MODELS_DIR / "teacher.card.json", "teacher", (256, 256), workdir),
    )


def _card_or_standin(
    card_path: Path, role: Literal["student", "teacher"], hidden: tuple[int, ...], workdir: Path
) -> ModelFiles:
    if card_path.exists():
        return ModelFiles(card_path, model_path(card_path, load_card(card_path)), standin=False)
    onnx_path = workdir / f"{role}-standin.onnx"
    onnx_path.write_bytes(standin_mlp_bytes(hidden, seed=0 if role == "student" else 1))
    standin_card = workdir / f"{role}-standin.card.json"
    write_card(
        standin_card,
        ModelCard(
            name=f"digits-{role}-standin",
            role=role,
            version="standin",
            file=onnx_path.name,
            sha256=sha256_file(onnx_path),
            bytes=onnx_path.stat().st_size,
            inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, N_FEATURES])],
            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, N_CLASSES])],
            class_labels=[str(i) for i in range(N_CLASSES)],
        ),
    )
    return ModelFiles(standin_card, onnx_path, standin=True)


def standin_mlp_bytes(hidden: tuple[int, ...], seed: int) -> bytes:
    """A serialized ONNX MLP 64 -> hidden... -> 10 with ReLU, seeded random weights.

    Pixels in [0, 16] are scaled by 1/16 inside the graph, as the real models do.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = (N_FEATURES, *hidden, N_CLASSES)
    scale = numpy_helper.from_array(np.array(1 / 16, dtype=np.float32), "scale")
    initializers = [scale]
    nodes = [helper.make_node("Mul", ["input", "scale"], ["h0"])]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        weight = rng.normal(0, fan_in**-0.5, (fan_in, fan_out)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        last = i == len(sizes) - 2
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], ["logits" if last else f"a{i}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i + 1}"]))
    graph = helper.make_graph(
        nodes,
        "digits_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def payload_row() -> np.ndarray:
    """One digits image as float32 [64]: reference.npz `inputs[0]` if shipped, else sklearn's."""
    reference = MODELS_DIR / "reference.npz"
    if reference.exists():
        with np.load(reference, allow_pickle=False) as data:
            return np.asarray(data["inputs"][0], dtype=np.float32)
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().data[0], dtype=np.float32)


def v2_body(row: np.ndarray) -> bytes:
    """A V2 (Open Inference Protocol) JSON infer request for one row, batch 1."""
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, int(row.size)],
                "datatype": "FP32",
                "data": [float(v) for v in row],
            }
        ]
    }
    return json.dumps(request, separators=(",", ":")).encode()
