"""The soft-label cache: teacher logits for the training inputs, kept on disk.

Running the teacher is the expensive half of distillation, and its answer depends only on the
teacher file and the data. An entry is keyed by (teacher sha256, dataset sha256, temperature):
the logits themselves do not depend on T, but the soft targets softmax(logits / T) do, and the key
names the exact targets a student was trained on. Entries are plain .npz (no pickle) holding the
logits and the full key, which is checked on read so a renamed file cannot be mistaken for another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

Teacher = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class CacheKey:
    """What a cached set of teacher logits was computed from."""

    teacher_sha256: str
    dataset_sha256: str
    temperature: float

    @property
    def filename(self) -> str:
        return f"{self.teacher_sha256[:16]}-{self.dataset_sha256[:16]}-T{self.temperature:g}.npz"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/kdgate/soft-labels, else ~/.cache/kdgate/soft-labels (not models/)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdgate" / "soft-labels"


class SoftLabelCache:
    """Teacher logits on disk under `root`, one .npz per key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: CacheKey) -> Path:
        return self.root / key.filename

    def load(self, key: CacheKey, rows: int) -> npt.NDArray[np.float32] | None:
        """The cached logits [rows, C] for `key`, or None on a miss or a stale entry."""
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as entry:
            stored = CacheKey(
                str(entry["teacher_sha256"]),
                str(entry["dataset_sha256"]),
                float(entry["temperature"]),
            )
            logits = np.asarray(entry["teacher_logits"], dtype=np.float32)
        if stored != key or logits.shape[0] != rows:
            return None
        return logits

    def store(self, key: CacheKey, logits: npt.NDArray[np.float32]) -> Path:
        """Write an entry atomically (a concurrent reader sees the old file or the new one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(
                fh,
                teacher_logits=np.asarray(logits, dtype=np.float32),
                teacher_sha256=np.str_(key.teacher_sha256),
                dataset_sha256=np.str_(key.dataset_sha256),
                temperature=np.float64(key.temperature),
            )
        tmp.replace(path)
        return path


def teacher_logits(
    cache: SoftLabelCache,
    key: CacheKey,
    teacher: Teacher,
    inputs: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], bool]:
    """Teacher logits for `inputs`, from the cache when present; returns (logits, was_cached)."""
    cached = cache.load(key, rows=inputs.shape[0])
    if cached is not None:
        return cached, True
    logits = np.asarray(teacher(inputs), dtype=np.float32)
    cache.store(key, logits)
    return logits, False
