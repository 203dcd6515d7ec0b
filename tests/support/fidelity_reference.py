"""Independent fidelity figures (onnxruntime + scipy + loops) and the same figures read back
from a kdgate `/metrics` exposition, for tests that compare the two."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families
from scipy.special import softmax
from scipy.stats import entropy

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"


@dataclass(frozen=True)
class Fidelity:
    samples: int
    agreement: float
    mean_kl: float
    ece: float


def onnx_logits(model: Path, inputs: np.ndarray) -> np.ndarray:
    """Logits of an ONNX model file, run directly (no kdgate code)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input": inputs.astype(np.float32)})
    return np.asarray(out, dtype=np.float64)


def brute_force_ece(probs: np.ndarray, reference: np.ndarray, bins: int = 15) -> float:
    """ECE of `probs` against reference classes: per-bin |correct - confidence| summed, / N."""
    correct = [0.0] * bins
    confidence = [0.0] * bins
    for row, ref in zip(probs, reference, strict=True):
        top = int(np.argmax(row))
        c = float(row[top])
        b = min(int(c * bins), bins - 1)
        confidence[b] += c
        correct[b] += 1.0 if top == int(ref) else 0.0
    return sum(abs(a - b) for a, b in zip(correct, confidence, strict=True)) / len(probs)


def expected(student_logits: np.ndarray, teacher_logits: np.ndarray) -> Fidelity:
    """Agreement, mean KL(teacher || student) and ECE against the teacher, from scipy."""
    p_student = softmax(student_logits, axis=1)
    p_teacher = softmax(teacher_logits, axis=1)
    teacher_top = p_teacher.argmax(axis=1)
    return Fidelity(
        samples=len(student_logits),
        agreement=float(np.mean(p_student.argmax(axis=1) == teacher_top)),
        mean_kl=float(np.mean(entropy(p_teacher, p_student, axis=1))),
        ece=brute_force_ece(p_student, teacher_top),
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


def from_metrics(text: str, model: str = "digits", reference: str = "teacher") -> Fidelity:
    """The same figures derived from the exported counters, as the PromQL in docs/metrics.md."""
    n = value(text, "kdgate_fidelity_samples_total", model=model)
    kl_count = value(text, "kdgate_fidelity_kl_divergence_nats_count", model=model)
    cal_samples = value(text, "kdgate_calibration_samples_total", model=model, reference=reference)
    gap = sum(
        abs(
            value(text, "kdgate_calibration_correct_total", model=model, reference=reference, bin=b)
            - value(
                text, "kdgate_calibration_confidence_total", model=model, reference=reference, bin=b
            )
        )
        for b in map(str, range(15))
    )
    return Fidelity(
        samples=int(n),
        agreement=value(text, "kdgate_fidelity_agreements_total", model=model) / n,
        mean_kl=value(text, "kdgate_fidelity_kl_divergence_nats_sum", model=model) / kl_count,
        ece=gap / cal_samples,
    )
