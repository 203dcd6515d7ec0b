"""The teacher and student networks for the digits pair.

Both take raw pixels, float32 [N, 64] in 0..16, and return logits [N, 10]. The /16 scaling is
the first layer of each network, so it travels inside the exported ONNX graph and a caller never
has to know about it.
"""

from __future__ import annotations

import torch
from torch import nn

from kdgate.distill.data import N_CLASSES, N_FEATURES

PIXEL_MAX = 16.0


class _Scale(nn.Module):
    """Multiply by a constant (exported as one ONNX Mul)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class _AsImage(nn.Module):
    """[N, 64] -> [N, 1, 8, 8]; -1 keeps the batch axis dynamic in the exported graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def teacher_cnn() -> nn.Sequential:
    """A small CNN (~151k parameters): two 3x3 convolutions, a 2x2 max-pool, two dense layers."""
    return nn.Sequential(
        _Scale(1.0 / PIXEL_MAX),
        _AsImage(),
        nn.Conv2d(1, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, N_CLASSES),
    )


def student_mlp(hidden: int = 64) -> nn.Sequential:
    """An MLP 64 -> hidden -> 10 (4,810 parameters at hidden=64)."""
    return nn.Sequential(
        _Scale(1.0 / PIXEL_MAX),
        nn.Linear(N_FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, N_CLASSES),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
