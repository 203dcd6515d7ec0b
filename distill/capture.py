"""Captured (input, teacher logits) pairs: the training set of a retrain.

A capture is one .npz file or a directory of them (read in name order), each holding the
digits input [N, 64] (raw pixels) and the teacher's scores [N, 10], in either layout:
- the gateway's (monitoring/capture.py): one `inputs/<name>` array, `teacher_scores` and
  `teacher_kind` ("logits", or "probabilities", read as logits by taking their log: the softmax of
  log p is p again);
- a hand-made one: `inputs` and `teacher_logits`.
Optionally `labels` int64 [N]. A file without `labels`, or a label of -1, marks rows the student
learns from the teacher alone (alpha = 0 for those rows). Files are loaded without pickle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kdgate.distill.data import N_CLASSES, N_FEATURES
from kdgate.distill.losses import UNLABELLED
from kdgate.monitoring.capture import INPUT_PREFIX
from kdgate.monitoring.fidelity import PROBABILITY_EPS


class CaptureError(ValueError):
    """A capture file is missing, empty or not in the expected format."""


@dataclass(frozen=True)
class Capture:
    """All rows of a capture, concatenated; `labels` is -1 where no label was captured."""

    inputs: npt.NDArray[np.float32]
    teacher_logits: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    files: list[str]
    sha256: str

    def describe(self) -> dict[str, Any]:
        """What a model card records about the training data."""
        labelled = int(np.count_nonzero(self.labels != UNLABELLED))
        return {
            "name": "capture",
            "files": self.files,
            "sha256": self.sha256,
            "sizes": {"train": int(self.labels.shape[0]), "labelled": labelled},
        }


def load_capture(path: Path) -> Capture:
    """Read a capture file or directory; raise CaptureError with the offending file on bad input."""
    # Hidden files are partial segments still being written (monitoring/capture.py).
    files = (
        sorted(p for p in path.glob("*.npz") if not p.name.startswith("."))
        if path.is_dir()
        else [path]
    )
    if not files or not files[0].is_file():
        raise CaptureError(f"{path}: no capture .npz file found")
    inputs, logits, labels = [], [], []
    digest = hashlib.sha256()
    for file in files:
        x, t, y = _read(file)
        for array in (x, t, y):
            digest.update(array.tobytes())
        inputs.append(x)
        logits.append(t)
        labels.append(y)
    return Capture(
        inputs=np.concatenate(inputs),
        teacher_logits=np.concatenate(logits),
        labels=np.concatenate(labels),
        files=[f.name for f in files],
        sha256=digest.hexdigest(),
    )


def _read(
    file: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise CaptureError(f"{file}: not a readable .npz file ({exc})") from exc
    _gateway_layout(file, arrays)
    for key in ("inputs", "teacher_logits"):
        if key not in arrays:
            raise CaptureError(f"{file}: missing array {key!r} (has {sorted(arrays)})")
    x = arrays["inputs"].astype(np.float32, copy=False)
    t = arrays["teacher_logits"].astype(np.float32, copy=False)
    n = x.shape[0] if x.ndim == 2 else -1
    if x.shape != (n, N_FEATURES) or n == 0:
        raise CaptureError(f"{file}: inputs shape {x.shape}, expected [N>0, {N_FEATURES}]")
    if t.shape != (n, N_CLASSES):
        raise CaptureError(f"{file}: teacher_logits shape {t.shape}, expected [{n}, {N_CLASSES}]")
    if not (np.isfinite(x).all() and np.isfinite(t).all()):
        raise CaptureError(f"{file}: inputs and teacher_logits must be finite")
    if "labels" in arrays:
        y = arrays["labels"].astype(np.int64, copy=False)
        if y.shape != (n,) or not ((y == UNLABELLED) | ((y >= 0) & (y < N_CLASSES))).all():
            raise CaptureError(f"{file}: labels must be int [{n}] in 0..{N_CLASSES - 1} or -1")
    else:
        y = np.full(n, UNLABELLED, dtype=np.int64)
    return np.ascontiguousarray(x), np.ascontiguousarray(t), np.ascontiguousarray(y)


def _gateway_layout(file: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """Rename a gateway segment's arrays (see the module doc) to `inputs` and `teacher_logits`,
    in place; a file in the hand-made layout is left as it is."""
    if "teacher_scores" not in arrays:
        return
    named = [k for k in arrays if k.startswith(INPUT_PREFIX)]
    if len(named) != 1:
        raise CaptureError(f"{file}: digits takes one input, the capture has {named}")
    kind = str(arrays.get("teacher_kind", "logits"))
    scores = arrays["teacher_scores"].astype(np.float64)
    if kind == "probabilities":
        # log p is a logit vector whose softmax is p (clipped as the fidelity maths clips it).
        scores = np.log(np.clip(scores, PROBABILITY_EPS, 1.0))
    elif kind != "logits":
        raise CaptureError(f"{file}: teacher scores of kind {kind!r}, digits needs class scores")
    arrays["inputs"] = arrays.pop(named[0])
    arrays["teacher_logits"] = scores.astype(np.float32)
