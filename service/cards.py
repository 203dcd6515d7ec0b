"""Model cards: the JSON file beside every ONNX model, and the only way a model gets loaded.

A card names its ONNX file (relative to the card), the file's sha256, the tensor signature and
the figures measured when the model was made (`metrics`, typed by
`monitoring.card_figures.CardFigures`). `load_card` reads a card and `verify_model_file`
refuses a file whose bytes do not match the card, so a swapped or truncated model never serves.
`distill/` writes cards with the same model, so the format has one definition.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdgate.monitoring.card_figures import CardFigures
from kdgate.service.datatypes import Datatype

CARD_SCHEMA_VERSION = 1


class TensorSpec(BaseModel):
    """One named tensor of a model signature; -1 in `shape` is a dynamic dimension."""

    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: Datatype
    shape: list[int]


class ModelCard(BaseModel):
    """What `distill/` knows about a model, and what serving checks before loading it."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    role: Literal["teacher", "student"]
    version: str
    file: str = Field(description="ONNX file name, relative to the card")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    parameters: int = Field(ge=0, default=0)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # What the scores output holds: class logits, class probabilities (rows sum to 1), or
    # regression values (compared by error, without agreement or calibration).
    output_kind: Literal["logits", "probabilities", "regression"] = "logits"
    # The output holding the class scores (or the regression values); None: see `scores_output`.
    scores_output: str | None = None
    class_labels: list[str] = Field(default_factory=list)
    parent_teacher_sha256: str | None = None
    dataset: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: CardFigures = Field(default_factory=CardFigures)
    created_at: str = ""
    kdgate_version: str = ""


SCORES_NAMES = ("logits", "probabilities", "output_probability", "scores", "output")


def scores_output(card: ModelCard) -> str | None:
    """The output compared with the teacher: the card's `scores_output`, else the only output,
    else the first output named like scores (logits, probabilities, ...); None if none is.

    Classifiers converted from scikit-learn have a `label` and a `probabilities` output: the
    rule picks `probabilities` without configuration.
    """
    names = [t.name for t in card.outputs]
    if card.scores_output is not None:
        return card.scores_output if card.scores_output in names else None
    if len(names) == 1:
        return names[0]
    return next((n for n in SCORES_NAMES if n in names), None)


class ModelFileMismatch(Exception):
    """The model file's sha256 is not the one its card records."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(card_path: Path | str) -> ModelCard:
    """Parse a card file (no verification of the model file; see `verify_model_file`)."""
    return ModelCard.model_validate_json(Path(card_path).read_bytes())


def model_path(card_path: Path | str, card: ModelCard) -> Path:
    """The ONNX file a card describes."""
    return Path(card_path).resolve().parent / card.file


def verify_model_file(card_path: Path | str, card: ModelCard) -> bytes:
    """Return the model bytes after checking them against the card's sha256.

    Reading once and hashing those same bytes means the file cannot change between the check
    and the load.
    """
    path = model_path(card_path, card)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != card.sha256:
        raise ModelFileMismatch(
            f"{path.name}: sha256 {actual} does not match {card.sha256} recorded in its card"
        )
    return data


def write_card(card_path: Path | str, card: ModelCard) -> None:
    """Write a card as indented JSON (atomically: a reader never sees half a card)."""
    path = Path(card_path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # An unset `scores_output` is left out: the rule in `scores_output` decides, and cards
    # written before the field existed stay byte for byte the same.
    unset = {"scores_output"} if card.scores_output is None else None
    tmp.write_text(card.model_dump_json(indent=2, exclude=unset) + "\n")
    tmp.replace(path)
