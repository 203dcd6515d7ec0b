import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from kdgate.distill.data import load_split
from kdgate.distill.export import ParityError, check_parity, export_onnx, run, session
from kdgate.distill.nets import student_mlp, teacher_cnn


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return load_split(0).test.inputs


def _perturb_first_weight(model_bytes: bytes, delta: float) -> bytes:
    """Add `delta` to every element of the first weight matrix in the ONNX file."""
    model = onnx.load_from_string(model_bytes)
    initializer = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 2)
    weights = numpy_helper.to_array(initializer) + np.float32(delta)
    initializer.CopyFrom(numpy_helper.from_array(weights, initializer.name))
    return bytes(model.SerializeToString())


def test_export_has_named_io_and_a_dynamic_batch(inputs: np.ndarray) -> None:
    torch.manual_seed(0)
    model_bytes = export_onnx(teacher_cnn())
    sess = session(model_bytes)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", 64)
    assert (out.name, out.shape[1]) == ("logits", 10)
    assert isinstance(inp.shape[0], str)  # symbolic: any batch size
    for batch in (1, 7, 32):
        assert run(sess, inputs[:batch]).shape == (batch, 10)


def test_parity_holds_for_a_faithful_export(inputs: np.ndarray) -> None:
    torch.manual_seed(0)
    model = student_mlp()
    assert check_parity(model, export_onnx(model), inputs) <= 1e-4


def test_parity_catches_a_corrupted_export(inputs: np.ndarray) -> None:
    torch.manual_seed(0)
    model = student_mlp()
    corrupted = _perturb_first_weight(export_onnx(model), 0.5)
    with pytest.raises(ParityError, match=r"max \|logit diff\| .* > tolerance 1e-04 over 360 rows"):
        check_parity(model, corrupted, inputs)


def test_parity_catches_a_tiny_corruption_only_above_tolerance(inputs: np.ndarray) -> None:
    torch.manual_seed(0)
    model = student_mlp()
    # A 1e-7 nudge is within float32 noise at 1e-4; a 1e-2 nudge is not.
    check_parity(model, _perturb_first_weight(export_onnx(model), 1e-7), inputs)
    with pytest.raises(ParityError):
        check_parity(model, _perturb_first_weight(export_onnx(model), 1e-2), inputs)
