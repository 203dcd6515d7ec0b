"""ONNX export, the torch/onnxruntime parity check, and latency measurement.

Every figure on a model card is measured on the exported file with onnxruntime, because that file
(not the torch module) is what serves.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from kdgate.distill.data import N_FEATURES

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(Exception):
    """onnxruntime and torch disagree on the logits of the same inputs."""


def export_onnx(model: nn.Module) -> bytes:
    """Serialise a model [N, 64] -> [N, 10] to ONNX bytes with a dynamic batch axis."""
    model.eval()
    # The TorchScript exporter is deprecated in torch 2.9+ but needs no extra dependency
    # (the dynamo exporter needs onnxscript); its deprecation warning is expected here.
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(1, N_FEATURES),),
            path,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
        return path.read_bytes()


def session(model: bytes | Path) -> ort.InferenceSession:
    """A single-threaded CPU session, the configuration latency figures are quoted for."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Logits [N, 10] for inputs [N, 64]."""
    (logits,) = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(inputs, np.float32)})
    return np.asarray(logits, dtype=np.float32)


def torch_logits(model: nn.Module, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Logits [N, 10] of a torch model in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(inputs)))
    return np.asarray(logits.numpy(), dtype=np.float32)


def check_parity(
    model: nn.Module,
    onnx_model: bytes,
    inputs: npt.NDArray[np.float32],
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max abs logit difference between torch and onnxruntime; raise ParityError above tolerance."""
    expected = torch_logits(model, inputs)
    actual = run(session(onnx_model), inputs)
    if actual.shape != expected.shape:
        raise ParityError(f"ONNX output shape {actual.shape} != torch output {expected.shape}")
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    if not diff <= tolerance:  # `not <=` so that NaN fails too
        raise ParityError(
            f"ONNX export differs from the torch model: max |logit diff| {diff:.3g} "
            f"> tolerance {tolerance:.0e} over {inputs.shape[0]} rows"
        )
    return diff


def latency_us_per_row(
    sess: ort.InferenceSession,
    inputs: npt.NDArray[np.float32],
    batch: int,
    repeats: int = 200,
) -> float:
    """Median wall time of one run at `batch` rows, divided by `batch`, in microseconds."""
    rows = np.ascontiguousarray(np.resize(inputs, (batch, inputs.shape[1])), np.float32)
    for _ in range(20):  # warm-up: first runs allocate arenas
        run(sess, rows)
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        run(sess, rows)
        samples[i] = time.perf_counter() - start
    return float(np.median(samples) / batch * 1e6)
