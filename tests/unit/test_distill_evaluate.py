import numpy as np
import pytest
from scipy.special import rel_entr, softmax

from kdgate.distill import evaluate


def _ece_brute_force(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    probs = softmax(logits.astype(np.float64), axis=1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [
            i
            for i in range(len(labels))
            if (lo <= probs[i].max() < hi) or (b == bins - 1 and probs[i].max() == 1.0)
        ]
        if members:
            correct = sum(int(np.argmax(probs[i]) == labels[i]) for i in members)
            confidence = sum(float(probs[i].max()) for i in members)
            total += abs(correct - confidence)
    return total / len(labels)


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    teacher = rng.normal(scale=3.0, size=(500, 10)).astype(np.float32)
    student = (teacher + rng.normal(scale=1.5, size=teacher.shape)).astype(np.float32)
    labels = np.where(rng.random(500) < 0.8, teacher.argmax(1), rng.integers(0, 10, 500))
    return teacher, student, labels


def test_kl_matches_scipy(pair: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    teacher, student, _ = pair
    p = softmax(teacher.astype(np.float64), axis=1)
    q = softmax(student.astype(np.float64), axis=1)
    expected = rel_entr(p, q).sum(axis=1)
    assert evaluate.mean_kl(teacher, student) == pytest.approx(expected.mean())
    assert evaluate.mean_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_brute_force(pair: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, student, labels = pair
    assert evaluate.ece(student, labels) == pytest.approx(_ece_brute_force(student, labels))


def test_ece_of_a_certain_correct_model_is_zero() -> None:
    logits = np.array([[100.0, 0.0], [0.0, 100.0]])
    assert evaluate.ece(logits, np.array([0, 1])) == pytest.approx(0.0, abs=1e-12)
    # Certain and always wrong: the worst possible calibration.
    assert evaluate.ece(logits, np.array([1, 0])) == pytest.approx(1.0)


def test_accuracy_and_agreement_count_rows() -> None:
    a = np.eye(4)
    b = np.eye(4)[[0, 1, 3, 2]]
    assert evaluate.accuracy(a, np.array([0, 1, 2, 0])) == 0.75
    assert evaluate.agreement(a, b) == 0.5
