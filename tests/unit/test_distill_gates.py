from pathlib import Path

import numpy as np
import pytest

from kdgate.distill import evaluate
from kdgate.distill.data import load_split
from kdgate.distill.export import run, session
from kdgate.distill.gates import GateFailure, GateThresholds, Measured, enforce
from kdgate.distill.gates import evaluate as judge

MODELS = Path(__file__).resolve().parents[2] / "models" / "digits"


def _measure(
    student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, sizes: tuple[int, int]
) -> Measured:
    return Measured(
        teacher_accuracy=evaluate.accuracy(teacher, labels),
        student_accuracy=evaluate.accuracy(student, labels),
        agreement=evaluate.agreement(student, teacher),
        student_ece=evaluate.ece(student, labels),
        teacher_bytes=sizes[0],
        student_bytes=sizes[1],
    )


@pytest.fixture(scope="module")
def teacher_test() -> tuple[np.ndarray, np.ndarray]:
    test = load_split(0).test
    return run(session(MODELS / "teacher.onnx"), test.inputs), test.labels


def test_a_faithful_student_passes(teacher_test: tuple[np.ndarray, np.ndarray]) -> None:
    teacher, labels = teacher_test
    results = enforce(_measure(teacher / 2.0, teacher, labels, (600_000, 20_000)), GateThresholds())
    assert [r.name for r in results] == ["accuracy", "agreement", "calibration", "size"]
    assert all(r.passed for r in results)


def test_a_bad_student_is_rejected_by_every_gate(
    teacher_test: tuple[np.ndarray, np.ndarray],
) -> None:
    teacher, labels = teacher_test
    # Every 8th row answers the next class, with near-certainty: less accurate, disagreeing with
    # the teacher, overconfident, and too big as well.
    student = teacher * 20.0
    student[::8] = np.roll(student[::8], 1, axis=1)
    m = _measure(student, teacher, labels, (600_000, 200_000))
    with pytest.raises(GateFailure) as caught:
        enforce(m, GateThresholds())
    assert {f.name for f in caught.value.failures} == {
        "accuracy",
        "agreement",
        "calibration",
        "size",
    }
    message = str(caught.value)
    assert "rejected by 4 gate(s)" in message
    assert f"top-1 agreement with the teacher {m.agreement:.2%}: must be >= 95.00%" in message
    assert "3.0x: must be >= 5x" in message
    assert f"student ECE {m.student_ece:.4f}: must be <= 0.0500" in message


@pytest.mark.parametrize(
    ("measured", "failing"),
    [
        (Measured(0.99, 0.969, 0.99, 0.01, 100, 10), "accuracy"),
        (Measured(0.99, 0.98, 0.949, 0.01, 100, 10), "agreement"),
        (Measured(0.99, 0.98, 0.99, 0.051, 100, 10), "calibration"),
        (Measured(0.99, 0.98, 0.99, 0.01, 100, 21), "size"),
    ],
)
def test_each_gate_fires_alone_at_its_threshold(measured: Measured, failing: str) -> None:
    failed = [r.name for r in judge(measured, GateThresholds()) if not r.passed]
    assert failed == [failing]


def test_thresholds_are_configurable() -> None:
    m = Measured(0.99, 0.95, 0.96, 0.04, 100, 30)
    assert not all(r.passed for r in judge(m, GateThresholds()))
    assert all(r.passed for r in judge(m, GateThresholds(max_accuracy_drop=0.05, min_size_ratio=3)))
