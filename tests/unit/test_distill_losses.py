import math

import pytest
import torch

from kdgate.distill.losses import UNLABELLED, kd_loss


def _brute_force(
    student: list[list[float]],
    teacher: list[list[float]],
    labels: list[int],
    t: float,
    alpha: float,
) -> float:
    """The KD loss written out term by term with the math module."""

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    total = 0.0
    for s, te, y in zip(student, teacher, labels, strict=True):
        p = softmax([v / t for v in te])
        q = softmax([v / t for v in s])
        kl = sum(pk * math.log(pk / qk) for pk, qk in zip(p, q, strict=True))
        a = alpha if y != UNLABELLED else 0.0
        ce = -math.log(softmax(s)[y]) if y != UNLABELLED else 0.0
        total += a * ce + (1 - a) * t * t * kl
    return total / len(labels)


def test_closed_form_soft_term() -> None:
    # Teacher at T=4 gives p = (3/4, 1/4); a uniform student gives q = (1/2, 1/2).
    t = 4.0
    teacher = torch.tensor([[t * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = t * t * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    got = kd_loss(student, teacher, torch.tensor([0]), temperature=t, alpha=0.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_closed_form_hard_term() -> None:
    # Student equal to the teacher: the soft term vanishes and uniform logits give CE = ln 3.
    logits = torch.zeros(1, 3)
    got = kd_loss(logits, logits, torch.tensor([2]), temperature=4.0, alpha=0.2)
    assert float(got) == pytest.approx(0.2 * math.log(3.0), rel=1e-6)


def test_matches_brute_force_with_an_unlabelled_row() -> None:
    student = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2], [-2.0, 0.0, 0.5]]
    teacher = [[2.5, -1.0, 1.0], [0.0, 3.0, -0.5], [-1.0, -1.0, 4.0]]
    labels = [0, 1, UNLABELLED]
    got = kd_loss(
        torch.tensor(student, dtype=torch.float64),
        torch.tensor(teacher, dtype=torch.float64),
        torch.tensor(labels),
        temperature=3.0,
        alpha=0.4,
    )
    assert float(got) == pytest.approx(_brute_force(student, teacher, labels, 3.0, 0.4), rel=1e-9)


@pytest.mark.parametrize(("t", "alpha"), [(0.0, 0.5), (-1.0, 0.5), (4.0, 1.5), (4.0, -0.1)])
def test_rejects_nonsense_settings(t: float, alpha: float) -> None:
    z = torch.zeros(1, 3)
    with pytest.raises(ValueError):
        kd_loss(z, z, torch.tensor([0]), temperature=t, alpha=alpha)
