"""The digits data set and its fixed train / validation / test split.

scikit-learn ships `load_digits` (1,797 8x8 images, pixel values 0..16), so distillation needs no
download. The split is stratified 60/20/20 with a recorded seed, and `sha256` fingerprints the
pixels, the labels and the split indices together: the same hash means the same rows in the same
roles, so a soft-label cache or a model card can name exactly what it was built from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DATASET_NAME = "sklearn.datasets.load_digits"
DEFAULT_SEED = 0
N_FEATURES = 64
N_CLASSES = 10
CLASS_LABELS = [str(d) for d in range(N_CLASSES)]

Inputs = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Part:
    """One role of the split: inputs float32 [N, 64] (raw pixels 0..16) and labels int64 [N]."""

    inputs: Inputs
    labels: Labels
    indices: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DigitsSplit:
    """The three roles of the split, the seed that drew them and their content hash."""

    train: Part
    validation: Part
    test: Part
    seed: int
    sha256: str

    def describe(self) -> dict[str, Any]:
        """What a model card records about the data."""
        return {
            "name": DATASET_NAME,
            "split": "stratified 60/20/20 (train/validation/test)",
            "seed": self.seed,
            "sha256": self.sha256,
            "sizes": {
                "train": len(self.train),
                "validation": len(self.validation),
                "test": len(self.test),
            },
        }


def load_split(seed: int = DEFAULT_SEED) -> DigitsSplit:
    """Load the digits and split them 60/20/20, stratified by label, deterministically by seed."""
    bunch = load_digits()
    inputs = np.ascontiguousarray(bunch.data, dtype=np.float32)
    labels = np.ascontiguousarray(bunch.target, dtype=np.int64)
    everything = np.arange(labels.shape[0], dtype=np.int64)
    train_idx, rest_idx = train_test_split(
        everything, test_size=0.4, stratify=labels, random_state=seed
    )
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=0.5, stratify=labels[rest_idx], random_state=seed
    )
    train, validation, test = (
        _part(inputs, labels, np.sort(idx)) for idx in (train_idx, val_idx, test_idx)
    )
    digest = hashlib.sha256()
    for array in (inputs, labels, train.indices, validation.indices, test.indices):
        digest.update(np.ascontiguousarray(array).tobytes())
    return DigitsSplit(train, validation, test, seed=seed, sha256=digest.hexdigest())


def _part(inputs: Inputs, labels: Labels, idx: npt.NDArray[np.int64]) -> Part:
    return Part(inputs=inputs[idx], labels=labels[idx], indices=idx.astype(np.int64))
