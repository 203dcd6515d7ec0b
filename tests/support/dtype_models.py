"""Small ONNX models of every V2 datatype and common signatures, built with `onnx.helper`.

    every_datatype_model()  one input and one Identity output per datatype: in_<dt> -> out_<dt>
    text_model()            input_ids, attention_mask INT64 [N, L] -> masked [N, L], lengths [N]
    image_model()           pixels FP32 [N, 3, 8, 8] -> channel means FP32 [N, 3]
    strings_model()         text BYTES [N] -> label BYTES [N] (Identity), is_spam BOOL [N]

`write_student` writes a model and its card (signature read back from the graph);
`write_dtype_config` a kdgate config serving all four, each under its own model name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper

from kdgate.service.cards import ModelCard, TensorSpec, sha256_file, write_card
from kdgate.service.datatypes import DATATYPES

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
_FROM_ONNX = {code: name for name, code in ONNX_TYPES.items()}
WIDTH = 3  # columns of every_datatype_model's tensors


def _model(graph: onnx.GraphProto, opset: int = 19) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def every_datatype_model() -> onnx.ModelProto:
    names = [dt.lower() for dt in DATATYPES]
    return _model(
        helper.make_graph(
            [helper.make_node("Identity", [f"in_{n}"], [f"out_{n}"]) for n in names],
            "every_datatype",
            [
                helper.make_tensor_value_info(f"in_{n}", ONNX_TYPES[dt], ["batch", WIDTH])
                for n, dt in zip(names, DATATYPES, strict=True)
            ],
            [
                helper.make_tensor_value_info(f"out_{n}", ONNX_TYPES[dt], ["batch", WIDTH])
                for n, dt in zip(names, DATATYPES, strict=True)
            ],
        )
    )


def text_model() -> onnx.ModelProto:
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    return _model(
        helper.make_graph(
            [
                helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
                helper.make_node("ReduceSum", ["attention_mask", "axes"], ["lengths"], keepdims=0),
            ],
            "text",
            [
                helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
                helper.make_tensor_value_info(
                    "attention_mask", TensorProto.INT64, ["batch", "length"]
                ),
            ],
            [
                helper.make_tensor_value_info("masked", TensorProto.INT64, ["batch", "length"]),
                helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]),
            ],
            [axes],
        )
    )


def image_model() -> onnx.ModelProto:
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    return _model(
        helper.make_graph(
            [helper.make_node("ReduceMean", ["pixels", "axes"], ["means"], keepdims=0)],
            "image",
            [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
            [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3])],
            [axes],
        )
    )


def strings_model() -> onnx.ModelProto:
    spam = helper.make_tensor("spam", TensorProto.STRING, [], [b"spam"])
    return _model(
        helper.make_graph(
            [
                helper.make_node("Identity", ["text"], ["label"]),
                helper.make_node("Equal", ["text", "spam"], ["is_spam"]),
            ],
            "strings",
            [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
            [
                helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"]),
                helper.make_tensor_value_info("is_spam", TensorProto.BOOL, ["batch"]),
            ],
            [spam],
        )
    )


MODELS = {
    "types": every_datatype_model,
    "text": text_model,
    "image": image_model,
    "strings": strings_model,
}


def _specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    return [
        TensorSpec(
            name=v.name,
            datatype=_FROM_ONNX[v.type.tensor_type.elem_type],  # type: ignore[arg-type]
            shape=[
                d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
            ],
        )
        for v in values
    ]


def write_student(directory: Path, name: str, model: onnx.ModelProto) -> Path:
    """Write `<name>.onnx` and `<name>.card.json` (version 1) into `directory`; the card path."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / f"{name}.onnx"
    onnx.save(model, onnx_path)
    card = ModelCard(
        name=name,
        role="student",
        version="1",
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        bytes=onnx_path.stat().st_size,
        inputs=_specs(list(model.graph.input)),
        outputs=_specs(list(model.graph.output)),
        output_kind="regression",
    )
    card_path = directory / f"{name}.card.json"
    write_card(card_path, card)
    return card_path


def write_dtype_config(directory: Path, **student: object) -> Path:
    """A kdgate config serving every model of `MODELS` (no teacher); `student` keys are added
    to each student entry (providers, session_options)."""
    models = [
        {
            "name": name,
            "students": [
                {
                    "version": "1",
                    "card": str(write_student(directory / "models", name, make())),
                    **student,
                }
            ],
        }
        for name, make in MODELS.items()
    ]
    config = {"server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2}, "models": models}
    path = directory / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sample(datatype: str, rows: int, seed: int = 0) -> np.ndarray:
    """[rows, WIDTH] values of `datatype` spanning its range (ends included where it has them)."""
    rng = np.random.default_rng(seed)
    shape = (rows, WIDTH)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BYTES":
        words = np.array(["", "ab", "héllo", "日本", "x y", "spam"], dtype=object)
        return words[rng.integers(0, len(words), shape)]
    dtype = np.dtype({"FP16": "f2", "FP32": "f4", "FP64": "f8"}.get(datatype, datatype.lower()))
    if dtype.kind == "f":
        values = rng.normal(0, 100, shape).astype(dtype)
        values.flat[0] = np.finfo(dtype).max
        values.flat[-1] = np.finfo(dtype).tiny
        return values
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    values.flat[0], values.flat[-1] = info.min, info.max
    return values
