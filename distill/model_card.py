"""Building the model cards that `distill/` writes beside each ONNX file.

The card format itself is `service.cards.ModelCard` (one definition, shared with serving); this
module only fills it in from what a distillation run measured.
"""

from __future__ import annotations

import importlib.metadata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kdgate.distill.data import CLASS_LABELS, N_CLASSES, N_FEATURES
from kdgate.distill.export import INPUT_NAME, OUTPUT_NAME
from kdgate.monitoring.card_figures import CardFigures
from kdgate.service.cards import ModelCard, TensorSpec, sha256_file

MODEL_NAME = "digits"


def kdgate_version() -> str:
    """The installed kdgate distribution's version ("unknown" when running from a bare tree)."""
    try:
        return importlib.metadata.version("kdgate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_card(
    onnx_path: Path,
    *,
    role: Literal["teacher", "student"],
    version: str,
    parameters: int,
    dataset: dict[str, Any],
    hyperparameters: dict[str, Any],
    metrics: CardFigures,
    parent_teacher_sha256: str | None = None,
) -> ModelCard:
    """A card for the ONNX file at `onnx_path` (its sha256 and size are read from the file)."""
    return ModelCard(
        name=MODEL_NAME,
        role=role,
        version=version,
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        bytes=onnx_path.stat().st_size,
        parameters=parameters,
        inputs=[TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, N_FEATURES])],
        outputs=[TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, N_CLASSES])],
        output_kind="logits",
        class_labels=list(CLASS_LABELS),
        parent_teacher_sha256=parent_teacher_sha256,
        dataset=dataset,
        hyperparameters=hyperparameters,
        metrics=metrics,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        kdgate_version=kdgate_version(),
    )
