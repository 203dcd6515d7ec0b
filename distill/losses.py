"""The knowledge-distillation loss (Hinton et al., 2015).

    loss = alpha * CE(labels, student)
         + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the batch. T^2 keeps the soft term's gradient on the same scale as the hard term's
when T changes. Rows without a label (label -1, e.g. from a shadow capture) use alpha = 0: they
learn from the teacher alone.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

UNLABELLED = -1


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Mean KD loss over the batch, in nats; `labels` int64 [N] with -1 for "no label"."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = temperature
    # KL from log-probabilities on both sides: no epsilon, exact for any logits.
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="none",
        log_target=True,
    ).sum(dim=1)
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    row_alpha = labelled.to(student_logits.dtype) * alpha
    per_row = row_alpha * hard + (1.0 - row_alpha) * (t * t) * soft
    return per_row.mean()
