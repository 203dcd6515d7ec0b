"""Two small students that are not tables, built with `onnx.helper`, with their model cards.

- `token_model`: a text classifier on two INT64 inputs `input_ids` and `attention_mask`
  [N, L]: an embedding (Gather), the mean over the unmasked tokens, a linear layer -> `logits`
  FP32 [N, 3].
- `image_model`: an image classifier on `image` FP32 [N, 1, 8, 8]: flatten, a linear layer, a
  softmax -> `probabilities` FP32 [N, 4] (card `output_kind: probabilities`).

`token_logits` and `image_probabilities` recompute the same maths in numpy, so a test can score
the arrays it sends without the server. Weights are fixed random numbers (seeded): the classes
mean nothing, but shifting the inputs moves the predicted classes and their confidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kdgate.service.cards import ModelCard, TensorSpec, sha256_file, write_card

VOCAB, EMBED, TOKEN_CLASSES, TOKENS = 50, 8, 3, 12
IMAGE_CLASSES = 4


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.normal(0, 1, (VOCAB, EMBED)).astype(np.float32),
        "w_tok": rng.normal(0, 1, (EMBED, TOKEN_CLASSES)).astype(np.float32),
        "b_tok": rng.normal(0, 0.1, TOKEN_CLASSES).astype(np.float32),
        "w_img": rng.normal(0, 0.05, (64, IMAGE_CLASSES)).astype(np.float32),
        "b_img": rng.normal(0, 0.1, IMAGE_CLASSES).astype(np.float32),
    }


def token_logits(input_ids: np.ndarray, attention_mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """The token model's logits [N, 3], in numpy."""
    w = _weights(seed)
    mask = attention_mask.astype(np.float32)[:, :, None]
    mean = (w["emb"][input_ids] * mask).sum(1) / mask.sum(1)
    return (mean @ w["w_tok"] + w["b_tok"]).astype(np.float32)


def image_probabilities(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The image model's probabilities [N, 4], in numpy."""
    w = _weights(seed)
    logits = images.reshape(len(images), 64).astype(np.float32) @ w["w_img"] + w["b_img"]
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


def token_model(seed: int = 0) -> onnx.ModelProto:
    w = _weights(seed)
    inits = [
        numpy_helper.from_array(w["emb"], "emb"),
        numpy_helper.from_array(w["w_tok"], "w"),
        numpy_helper.from_array(w["b_tok"], "b"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["embedded"]),  # [N, L, E]
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),  # [N, L, 1]
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),  # [N, E]
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),  # [N, 1]
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "token_student",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TOKEN_CLASSES])],
        inits,
    )
    return _checked(graph)


def image_model(seed: int = 0) -> onnx.ModelProto:
    w = _weights(seed)
    inits = [numpy_helper.from_array(w["w_img"], "w"), numpy_helper.from_array(w["b_img"], "b")]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "image_student",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    return _checked(graph)


def _checked(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


Family = Literal["tokens", "images"]


def write_student(directory: Path, family: Family, seed: int = 0) -> Path:
    """Write the `family` student and its card into `directory`; returns the card path."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / f"{family}-student.onnx"
    if family == "tokens":
        onnx.save(token_model(seed), onnx_path)
        inputs = [
            TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
            TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1]),
        ]
        outputs = [TensorSpec(name="logits", datatype="FP32", shape=[-1, TOKEN_CLASSES])]
        kind: Literal["logits", "probabilities"] = "logits"
        classes = TOKEN_CLASSES
    else:
        onnx.save(image_model(seed), onnx_path)
        inputs = [TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])]
        outputs = [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, IMAGE_CLASSES])]
        kind = "probabilities"
        classes = IMAGE_CLASSES
    card = ModelCard(
        name=family,
        role="student",
        version="1",
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        bytes=onnx_path.stat().st_size,
        inputs=inputs,
        outputs=outputs,
        output_kind=kind,
        class_labels=[f"c{i}" for i in range(classes)],
    )
    card_path = directory / f"{family}-student.card.json"
    write_card(card_path, card)
    return card_path


def token_batch(
    rng: np.random.Generator, rows: int, *, shifted: bool = False
) -> dict[str, np.ndarray]:
    """`rows` token sequences of length 12 with 6-12 real tokens; `shifted` draws the ids from
    the top tenth of the vocabulary instead of all of it (a new topic)."""
    low = VOCAB * 9 // 10 if shifted else 0
    ids = rng.integers(low, VOCAB, (rows, TOKENS), dtype=np.int64)
    lengths = rng.integers(6, TOKENS + 1, rows)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def image_batch(
    rng: np.random.Generator, rows: int, *, shifted: bool = False
) -> dict[str, np.ndarray]:
    """`rows` noisy 8x8 images in [0, 1]; `shifted` brightens them (+0.6, a new camera)."""
    images = rng.uniform(0, 1, (rows, 1, 8, 8)).astype(np.float32)
    return {"image": images + np.float32(0.6) if shifted else images}
