"""Re-measure the committed models/digits pair with onnxruntime on the test split.

Every figure is measured here from the ONNX files and the data, with implementations independent
of distill/evaluate.py, then compared with the cards (tolerance) and with the gates (limits).
"""

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from scipy.special import log_softmax, softmax

from kdgate.distill.data import load_split
from kdgate.service.cards import ModelCard, load_card, sha256_file, verify_model_file

MODELS = Path(__file__).resolve().parents[2] / "models" / "digits"
ROW = 1 / 360  # one test row, as a fraction of the test split


def _ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    probs = softmax(logits.astype(np.float64), axis=1)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence >= lo) & ((confidence < hi) | (b == bins - 1))
        total += abs(float((predicted[inside] == labels[inside]).sum() - confidence[inside].sum()))
    return total / float(labels.shape[0])


def _logits(card_name: str, inputs: np.ndarray) -> np.ndarray:
    card_path = MODELS / card_name
    sess = ort.InferenceSession(
        verify_model_file(card_path, load_card(card_path)), providers=["CPUExecutionProvider"]
    )
    (out,) = sess.run(["logits"], {"input": inputs})
    return np.asarray(out)


@pytest.fixture(scope="module")
def cards() -> tuple[ModelCard, ModelCard]:
    return load_card(MODELS / "teacher.card.json"), load_card(MODELS / "student-v1.card.json")


@pytest.fixture(scope="module")
def measured(cards: tuple[ModelCard, ModelCard]) -> dict[str, Any]:
    teacher_card, _ = cards
    split = load_split(teacher_card.dataset["seed"])
    test = split.test
    t = _logits("teacher.card.json", test.inputs)
    s = _logits("student-v1.card.json", test.inputs)
    kl = (softmax(t, axis=1) * (log_softmax(t, axis=1) - log_softmax(s, axis=1))).sum(axis=1)
    return {
        "dataset_sha256": split.sha256,
        "teacher_accuracy": float((t.argmax(1) == test.labels).mean()),
        "teacher_ece": _ece(t, test.labels),
        "student_accuracy": float((s.argmax(1) == test.labels).mean()),
        "agreement": float((s.argmax(1) == t.argmax(1)).mean()),
        "student_ece": _ece(s, test.labels),
        "kl": float(kl.mean()),
    }


def test_files_match_their_cards(cards: tuple[ModelCard, ModelCard]) -> None:
    teacher, student = cards
    for card in cards:
        path = MODELS / card.file
        assert sha256_file(path) == card.sha256
        assert path.stat().st_size == card.bytes
        assert card.name == "digits" and card.output_kind == "logits"
        assert card.class_labels == [str(d) for d in range(10)]
        assert [(t.name, t.datatype, t.shape) for t in card.inputs] == [("input", "FP32", [-1, 64])]
        assert [(t.name, t.datatype, t.shape) for t in card.outputs] == [
            ("logits", "FP32", [-1, 10])
        ]
    assert (teacher.role, student.role, student.version) == ("teacher", "student", "1")
    assert student.parent_teacher_sha256 == teacher.sha256
    assert teacher.parameters >= 5 * student.parameters


def test_data_is_the_data_the_cards_name(
    cards: tuple[ModelCard, ModelCard], measured: dict[str, Any]
) -> None:
    for card in cards:
        assert card.dataset["sha256"] == measured["dataset_sha256"]


def test_measured_figures_agree_with_the_cards(
    cards: tuple[ModelCard, ModelCard], measured: dict[str, Any]
) -> None:
    teacher, student = cards
    # A different CPU may round a near-tie the other way: allow one row for counts.
    assert measured["teacher_accuracy"] == pytest.approx(teacher.metrics.accuracy, abs=ROW)
    assert measured["teacher_ece"] == pytest.approx(teacher.metrics.ece, abs=0.005)
    assert measured["student_accuracy"] == pytest.approx(student.metrics.accuracy, abs=ROW)
    assert measured["agreement"] == pytest.approx(student.metrics.agreement, abs=ROW)
    assert measured["student_ece"] == pytest.approx(student.metrics.ece, abs=0.005)
    assert measured["kl"] == pytest.approx(student.metrics.kl_mean_nats, rel=0.05)


def test_measured_figures_pass_the_gates(
    cards: tuple[ModelCard, ModelCard], measured: dict[str, Any]
) -> None:
    teacher, student = cards
    assert measured["teacher_accuracy"] >= 0.98
    assert measured["student_accuracy"] >= measured["teacher_accuracy"] - 0.02
    assert measured["agreement"] >= 0.95
    assert measured["student_ece"] <= 0.05
    assert (MODELS / teacher.file).stat().st_size >= 5 * (MODELS / student.file).stat().st_size


def test_reference_sample_is_the_validation_split_with_teacher_logits(
    cards: tuple[ModelCard, ModelCard],
) -> None:
    validation = load_split(cards[0].dataset["seed"]).validation
    with np.load(MODELS / "reference.npz", allow_pickle=False) as ref:
        assert sorted(ref.files) == ["inputs", "labels", "teacher_logits"]
        inputs, logits, labels = ref["inputs"], ref["teacher_logits"], ref["labels"]
    assert (inputs.dtype, logits.dtype, labels.dtype) == (np.float32, np.float32, np.int64)
    np.testing.assert_array_equal(inputs, validation.inputs)
    np.testing.assert_array_equal(labels, validation.labels)
    np.testing.assert_allclose(logits, _logits("teacher.card.json", inputs), atol=1e-5)


def test_batch_axis_is_dynamic() -> None:
    x = load_split(0).test.inputs
    for card_name in ("teacher.card.json", "student-v1.card.json"):
        for batch in (1, 32):
            assert _logits(card_name, x[:batch]).shape == (batch, 10)
