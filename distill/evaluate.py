"""The figures a distillation run reports, as single numbers over a split.

The maths is `monitoring.fidelity` (the same functions the gateway's shadow path uses), so a
card's agreement, KL and ECE mean exactly what the live metrics mean; this module only reduces
the per-row values to split-level figures.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kdgate.monitoring import fidelity

Logits = npt.NDArray[np.floating]


def accuracy(logits: Logits, labels: npt.NDArray[np.integer]) -> float:
    """Share of rows whose top-1 class is the label, in [0, 1]."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def agreement(student_logits: Logits, teacher_logits: Logits) -> float:
    """Share of rows where student and teacher pick the same top-1 class, in [0, 1]."""
    return float(fidelity.agreement(student_logits, teacher_logits).mean())


def mean_kl(teacher_logits: Logits, student_logits: Logits) -> float:
    """Mean KL(softmax(teacher) || softmax(student)) over rows, in nats."""
    return float(fidelity.kl_from_logits(teacher_logits, student_logits).mean())


def ece(logits: Logits, reference: npt.NDArray[np.integer]) -> float:
    """Expected calibration error of the top-1 confidence against reference classes.

    15 equal-width bins over [0, 1] (`monitoring.fidelity.CALIBRATION_BINS`).
    """
    return fidelity.ece(fidelity.calibration_against(logits, reference))
