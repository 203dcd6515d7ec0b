"""A seeded mini-batch training loop with a progress bar.

Reproducibility: the caller seeds torch (`seed_everything`); batches are drawn from a
torch.Generator seeded from the same seed, so the same seed gives the same weights bit for bit on
the same machine and thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

# loss(model outputs [B, C], row indices [B]) -> scalar
BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings: Adam with a cosine-decayed learning rate."""

    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seed torch and ask for deterministic kernels (process-wide)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # Few threads: the machine is shared, the nets are tiny, and a fixed thread count keeps the
    # floating-point reduction order (and so the weights) reproducible.
    torch.set_num_threads(threads)


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: BatchLoss,
    settings: TrainSettings,
    *,
    seed: int,
    desc: str,
) -> float:
    """Train `model` in place on `inputs` [N, 64]; return the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.epochs)
    n = inputs.shape[0]
    last = float("nan")
    bar = tqdm(range(settings.epochs), desc=desc, unit="epoch", disable=None, leave=False)
    for _ in bar:
        model.train()
        total = 0.0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            rows = order[start : start + settings.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(inputs[rows]), rows)
            torch.autograd.backward(loss)
            optimiser.step()
            total += float(loss.detach()) * rows.shape[0]
        schedule.step()
        last = total / n
        bar.set_postfix(loss=f"{last:.4f}")
    model.eval()
    return last
