import json
from pathlib import Path

import pytest

from kdgate.service.cards import (
    ModelCard,
    ModelFileMismatch,
    load_card,
    sha256_file,
    verify_model_file,
    write_card,
)


def _card(tmp_path: Path, payload: bytes) -> Path:
    model = tmp_path / "m.onnx"
    model.write_bytes(payload)
    card = ModelCard(
        name="m",
        role="student",
        version="1",
        file="m.onnx",
        sha256=sha256_file(model),
        bytes=len(payload),
        inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
        class_labels=["a", "b"],
    )
    path = tmp_path / "m.card.json"
    write_card(path, card)
    return path


def test_round_trip_and_verification(tmp_path: Path) -> None:
    path = _card(tmp_path, b"model bytes")
    card = load_card(path)
    assert card.inputs[0].shape == [-1, 4]
    assert verify_model_file(path, card) == b"model bytes"
    assert json.loads(path.read_text())["sha256"] == card.sha256


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    path = _card(tmp_path, b"model bytes")
    (tmp_path / "m.onnx").write_bytes(b"model bytez")
    with pytest.raises(ModelFileMismatch, match="does not match"):
        verify_model_file(path, load_card(path))
