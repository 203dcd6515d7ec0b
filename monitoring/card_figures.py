"""The figures a model card records: what `distill/` measured, read by name everywhere.

The `metrics` section of a card (`service.cards.ModelCard.metrics`) is a `CardFigures`: the
figures of the split named by `split` (the test split, as `distill/` writes them) at the top
level, the same figures on the validation split under `validation`, and how fast the model ran::

    "metrics": {
      "split": "test", "accuracy": 0.98, "ece": 0.016, "agreement": 0.99, "kl_mean_nats": 0.016,
      "validation": {"accuracy": 0.99, "ece": 0.012, "agreement": 0.99, "kl_mean_nats": 0.021},
      "latency_us_per_row": {"batch_1": 28.6, "batch_32": 1.2}, ...
    }

Unknown keys are refused, so a misspelt figure fails the card's load instead of silently
leaving an SLO at its default; figures of other pipelines go under `extra`. The model lives in
`monitoring/` (not beside the card in `service/`) because SLO objectives are derived from it
and `monitoring/` does not import `service/`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

Fraction = Annotated[float | None, Field(ge=0, le=1)]
FigureName = Literal["accuracy", "ece", "agreement", "kl_mean_nats", "ece_teacher"]


class SplitFigures(BaseModel):
    """Quality figures measured on one data split; None where not measured.

    `accuracy` and `ece` are against the split's labels; `agreement` (top-1), `kl_mean_nats`
    (mean KL(teacher || student), nats) and `ece_teacher` (ECE with the teacher's top-1 as the
    reference) against the teacher, so only a student's card has them. They mean exactly what the
    live metrics of the same names mean (`distill/evaluate.py`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    accuracy: Fraction = None
    ece: Fraction = None
    agreement: Fraction = None
    kl_mean_nats: float | None = Field(default=None, ge=0)
    ece_teacher: Fraction = None

    @model_serializer(mode="wrap")
    def _measured_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A card lists what was measured: no nulls for figures a teacher's card cannot have.
        data: dict[str, Any] = handler(self)
        kept = {k: v for k, v in data.items() if v is not None and v != {}}
        return {"split": kept.pop("split"), **kept} if "split" in kept else kept


class CardFigures(SplitFigures):
    """A card's `metrics`: the `split` figures flat, `validation` figures, latency, gates."""

    split: Literal["test", "validation", "train", "unknown"] = "unknown"
    validation: SplitFigures | None = None
    latency_us_per_row: dict[str, float] = Field(
        default_factory=dict, description='microseconds per row by batch, e.g. {"batch_1": 28.6}'
    )
    latency_method: str = ""
    teacher_accuracy: Fraction = None
    size_ratio: float | None = Field(default=None, gt=0, description="teacher bytes / these")
    parity_max_abs_diff: float | None = Field(
        default=None, ge=0, description="ONNX vs framework outputs, max |difference|"
    )
    gates: dict[str, bool] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(
        default_factory=dict, description="figures of other pipelines; kdgate ignores them"
    )

    def measured(self, name: FigureName) -> float | None:
        """Figure `name` as objectives should see it: from `validation` (the split the model was
        selected on) where measured there, else the flat figure, else None."""
        for section in (self.validation, self):
            value = getattr(section, name, None) if section is not None else None
            if value is not None:
                return float(value)
        return None
