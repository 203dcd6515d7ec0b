import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdgate.service.cards import (
    ModelCard,
    ModelFileMismatch,
    load_card,
    sha256_file,
    verify_model_file,
    write_card,
)
from kdgate.service.settings import default_models_dir


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


def test_the_shipped_cards_load_typed_and_write_back_byte_for_byte(tmp_path: Path) -> None:
    for name in ("student-v1", "teacher"):
        path = default_models_dir() / "digits" / f"{name}.card.json"
        card = load_card(path)
        assert card.metrics.split == "test" and card.metrics.validation is not None
        assert card.metrics.accuracy is not None and card.metrics.ece is not None
        write_card(tmp_path / path.name, card)
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()
    student = load_card(default_models_dir() / "digits" / "student-v1.card.json").metrics
    assert student.agreement is not None and student.kl_mean_nats is not None
    assert student.gates == {"accuracy": True, "agreement": True, "calibration": True, "size": True}


def test_a_card_with_a_misspelt_figure_is_refused(tmp_path: Path) -> None:
    path = _card(tmp_path, b"model bytes")
    document = json.loads(path.read_text())
    document["metrics"] = {"split": "test", "agreemnt": 0.99}
    path.write_text(json.dumps(document))
    with pytest.raises(ValidationError, match="agreemnt"):
        load_card(path)
