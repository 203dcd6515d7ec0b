"""StudentSession: verified loading, signature check, results equal to a numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdgate.service.cards import ModelFileMismatch, load_card, write_card
from kdgate.service.runtime import SignatureMismatch, StudentSession
from tests.support.tiny_model import reference_logits, write_tiny_student


def test_results_equal_numpy(tmp_path: Path) -> None:
    session = StudentSession.from_card(write_tiny_student(tmp_path), intra_op_threads=1)
    session.warm_up(2)
    x = np.random.default_rng(0).uniform(0, 16, (5, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run({"input": x})["logits"], reference_logits(x), atol=1e-5)


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    card = write_tiny_student(tmp_path)
    (tmp_path / "student-v1.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileMismatch):
        StudentSession.from_card(card)


def test_card_signature_must_match_the_graph(tmp_path: Path) -> None:
    card_path = write_tiny_student(tmp_path)
    card = load_card(card_path)
    card.inputs[0].name = "pixels"
    write_card(card_path, card)
    with pytest.raises(SignatureMismatch, match="pixels"):
        StudentSession.from_card(card_path)
