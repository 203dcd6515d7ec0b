"""What a scenario serves and sends: a model pair, the model's URL name, one request body.

    digits      the default pair (models/digits): one FP32 [1, 64] row per request
    text-b1     a heavier text student: INT64 input_ids + attention_mask [1, 64] tokens
    text-b32    the same text student, 32 rows per request

The text pair is built here with the onnx helper API (no torch, no download): token embedding,
a per-token MLP and a masked mean, then a linear classifier over 4 classes. The student
(embedding 64, hidden 128) costs ~1 MFLOP per row, ~50x the digits MLP's ~20 kFLOP, so the
bench shows kdgate's overhead where the model, not the protocol, dominates; the teacher is
wider (embedding 128, hidden 512). The payload is seeded, so every run sends the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from bench.model import ModelFiles, payload_row, resolve_models, session, v2_body
from kdgate.service.cards import ModelCard, TensorSpec, sha256_file, write_card

WorkloadName = Literal["digits", "text-b1", "text-b32"]

TEXT_VOCAB = 1000
TEXT_LENGTH = 64
TEXT_CLASSES = 4


@dataclass(frozen=True)
class Workload:
    """A model pair, the name it is served under, and the one request every phase sends."""

    name: str
    model: str  # the model's name in the URL and the kdgate config
    student: ModelFiles
    teacher: ModelFiles
    body: bytes  # a V2 JSON infer request
    expected: np.ndarray  # the student's first output for `body`, from onnxruntime here

    @property
    def infer_path(self) -> str:
        return f"/v2/models/{self.model}/infer"


def build(name: WorkloadName, workdir: Path) -> Workload:
    """The workload `name`, its models written to `workdir` where they are built here."""
    if name == "digits":
        student, teacher = resolve_models(workdir)
        row = payload_row().reshape(1, -1)
        expected = session(student.onnx).run(None, {"input": row})[0]
        return Workload("digits", "digits", student, teacher, v2_body(row[0]), expected)
    rows = 32 if name == "text-b32" else 1
    student = _text_model(workdir, "student", embedding=64, hidden=128, seed=0)
    teacher = _text_model(workdir, "teacher", embedding=128, hidden=512, seed=1)
    feed = text_feed(rows)
    expected = session(student.onnx).run(None, feed)[0]
    return Workload(name, "text", student, teacher, text_body(feed), expected)


def text_feed(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`rows` token rows: ids in [1, vocab), the mask 1 over a random length >= 8, then 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TEXT_VOCAB, (rows, TEXT_LENGTH), dtype=np.int64)
    lengths = rng.integers(8, TEXT_LENGTH + 1, rows)
    mask = (np.arange(TEXT_LENGTH) < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def text_body(feed: dict[str, np.ndarray]) -> bytes:
    """A V2 JSON infer request with both INT64 inputs."""
    inputs = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": "INT64",
            "data": array.ravel().tolist(),
        }
        for name, array in feed.items()
    ]
    return json.dumps({"inputs": inputs}, separators=(",", ":")).encode()


def _text_model(
    workdir: Path, role: Literal["student", "teacher"], *, embedding: int, hidden: int, seed: int
) -> ModelFiles:
    onnx_path = workdir / f"text-{role}.onnx"
    card_path = workdir / f"text-{role}.card.json"
    if not card_path.exists():
        onnx_path.write_bytes(text_model_bytes(embedding, hidden, seed))
        write_card(
            card_path,
            ModelCard(
                name=f"text-{role}",
                role=role,
                version="1",
                file=onnx_path.name,
                sha256=sha256_file(onnx_path),
                bytes=onnx_path.stat().st_size,
                inputs=[
                    TensorSpec(name=name, datatype="INT64", shape=[-1, TEXT_LENGTH])
                    for name in ("input_ids", "attention_mask")
                ],
                outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, TEXT_CLASSES])],
                class_labels=[str(i) for i in range(TEXT_CLASSES)],
            ),
        )
    return ModelFiles(card_path, onnx_path, standin=False)


def text_model_bytes(embedding: int, hidden: int, seed: int) -> bytes:
    """ONNX: Gather embedding -> per-token MLP (ReLU) -> masked mean over tokens -> linear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            rng.normal(0, shape[0] ** -0.5, shape).astype(np.float32), name
        )

    initializers = [
        weight("embedding", TEXT_VOCAB, embedding),
        weight("w1", embedding, hidden),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        weight("w2", hidden, embedding),
        weight("wc", embedding, TEXT_CLASSES),
        numpy_helper.from_array(np.zeros(TEXT_CLASSES, np.float32), "bc"),
        numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
        numpy_helper.from_array(np.array([2], np.int64), "feature_axis"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["embedding", "input_ids"], ["tokens"]),  # [N, L, E]
        node("MatMul", ["tokens", "w1"], ["h1"]),
        node("Add", ["h1", "b1"], ["h1b"]),
        node("Relu", ["h1b"], ["h1r"]),
        node("MatMul", ["h1r", "w2"], ["h2"]),  # [N, L, E]
        node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["maskf", "feature_axis"], ["mask3"]),  # [N, L, 1]
        node("Mul", ["h2", "mask3"], ["masked"]),
        node("ReduceSum", ["masked", "token_axis"], ["summed"], keepdims=0),  # [N, E]
        node("ReduceSum", ["mask3", "token_axis"], ["count"], keepdims=0),  # [N, 1]
        node("Add", ["count", "eps"], ["count_eps"]),
        node("Div", ["summed", "count_eps"], ["pooled"]),
        node("MatMul", ["pooled", "wc"], ["scores"]),
        node("Add", ["scores", "bc"], ["logits"]),
    ]
    token_input: list[str | int | None] = ["batch", TEXT_LENGTH]
    graph = helper.make_graph(
        nodes,
        "text_classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, token_input),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, token_input),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TEXT_CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
