"""Validation gates: the conditions a new student must meet before it is written out.

Each gate compares one measured figure with a configurable threshold. All gates are evaluated,
and `enforce` raises one GateFailure naming every gate that failed, with the figure and the limit,
so a rejected run says exactly what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateThresholds:
    """Limits a student must meet; accuracies are fractions in [0, 1]."""

    max_accuracy_drop: float = 0.02
    min_agreement: float = 0.95
    max_ece: float = 0.05
    min_size_ratio: float = 5.0


@dataclass(frozen=True)
class Measured:
    """The figures the gates judge, measured on the test split with onnxruntime."""

    teacher_accuracy: float
    student_accuracy: float
    agreement: float
    student_ece: float
    teacher_bytes: int
    student_bytes: int


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    message: str


class GateFailure(Exception):
    """At least one gate failed; the message lists each failure."""

    def __init__(self, failures: list[GateResult]) -> None:
        self.failures = failures
        lines = "\n".join(f"  - {f.name}: {f.message}" for f in failures)
        super().__init__(f"student rejected by {len(failures)} gate(s):\n{lines}")


def evaluate(m: Measured, limits: GateThresholds) -> list[GateResult]:
    """Judge every gate; never raises."""
    floor = m.teacher_accuracy - limits.max_accuracy_drop
    ratio = m.teacher_bytes / m.student_bytes if m.student_bytes > 0 else float("inf")
    return [
        GateResult(
            "accuracy",
            m.student_accuracy >= floor,
            f"student accuracy {m.student_accuracy:.2%} vs teacher {m.teacher_accuracy:.2%}: "
            f"must be >= {floor:.2%} (at most {limits.max_accuracy_drop * 100:g} points lower)",
        ),
        GateResult(
            "agreement",
            m.agreement >= limits.min_agreement,
            f"top-1 agreement with the teacher {m.agreement:.2%}: "
            f"must be >= {limits.min_agreement:.2%}",
        ),
        GateResult(
            "calibration",
            m.student_ece <= limits.max_ece,
            f"student ECE {m.student_ece:.4f}: must be <= {limits.max_ece:.4f}",
        ),
        GateResult(
            "size",
            ratio >= limits.min_size_ratio,
            f"teacher ONNX {m.teacher_bytes} bytes / student ONNX {m.student_bytes} bytes = "
            f"{ratio:.1f}x: must be >= {limits.min_size_ratio:g}x",
        ),
    ]


def enforce(m: Measured, limits: GateThresholds) -> list[GateResult]:
    """Evaluate every gate; raise GateFailure if any failed, else return the results."""
    results = evaluate(m, limits)
    failures = [r for r in results if not r.passed]
    if failures:
        raise GateFailure(failures)
    return results
