"""SLO definitions and the objectives they resolve to for each model.

One `SloConfig` (the `slo:` section of the service settings) drives two evaluators: the in-process
`monitoring.slo_monitor.Monitor` (single node: it asks for the retrain itself) and the Prometheus
rules rendered by `monitoring.rules` (fleets). `evaluator` says which one asks for retrains: with
"fleet" the in-process monitor still evaluates and exports, and retrain requests come only from
Alertmanager through `POST /v1/hooks/alertmanager`, once for the whole fleet::

    objectives = {"digits": objectives_for(student_card.metrics, settings.slo, "digits")}

`student_card.metrics` is the card's typed figures (`monitoring.card_figures.CardFigures`).

Each `Objective` records where its value came from (`source`): "config" (set explicitly, globally
or per model), "default", or "model card (headroom ...)" when the card's measured validation
figure already misses the default, so that clean traffic from that model does not page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from kdgate.monitoring.card_figures import CardFigures, FigureName

Evaluator = Literal["local", "fleet"]

SloName = Literal["agreement", "kl_mean", "ece_teacher", "ece_label", "p95_latency", "drift_share"]
SLO_NAMES: tuple[SloName, ...] = (
    "agreement",
    "kl_mean",
    "ece_teacher",
    "ece_label",
    "p95_latency",
    "drift_share",
)

# Headroom applied when a model card's measured validation figure is already worse than the
# default objective: production traffic is noisier than a validation split, and an objective the
# model misses on clean data would page forever.
KL_HEADROOM_FACTOR = 2.0
ECE_HEADROOM_FACTOR = 2.0
AGREEMENT_HEADROOM_POINTS = 0.02

# The card figure each objective can be derived from; latency and drift have none.
CARD_FIGURE: dict[SloName, FigureName] = {
    "agreement": "agreement",
    "kl_mean": "kl_mean_nats",
    "ece_label": "ece",
    "ece_teacher": "ece_teacher",
}


class SloOverrides(BaseModel):
    """Per-model objective overrides; unset fields fall back to the global `SloConfig` value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agreement_min: float | None = Field(default=None, ge=0, le=1)
    kl_mean_max: float | None = Field(default=None, gt=0)
    ece_max: float | None = Field(default=None, gt=0, le=1)
    ece_label_max: float | None = Field(default=None, gt=0, le=1)
    p95_latency_max_seconds: float | None = Field(default=None, gt=0)
    drift_share_max: float | None = Field(default=None, gt=0, le=1)


class SloConfig(SloOverrides):
    """The `slo:` section: objectives, the window they are measured over, and the monitor cadence.

    A key set explicitly (YAML or environment) is used as is (source "config"). A key left at its
    default may be relaxed per model from the model card (see `objectives_for`).
    """

    agreement_min: float = Field(default=0.95, ge=0, le=1)
    kl_mean_max: float = Field(default=0.05, gt=0, description="mean KL(teacher||student), nats")
    ece_max: float = Field(default=0.05, gt=0, le=1, description="ECE of the student vs teacher")
    ece_label_max: float | None = Field(
        default=None, gt=0, le=1, description="ECE vs feedback labels; None = ece_max"
    )
    p95_latency_max_seconds: float = Field(default=0.1, gt=0)
    drift_share_max: float = Field(default=0.5, gt=0, le=1)
    window_seconds: float = Field(default=300, gt=0)
    min_samples: int = Field(default=200, ge=1)
    evaluate_every_seconds: float = Field(default=15, gt=0)
    consecutive_breaches: int = Field(default=3, ge=1, description="k for hysteresis")
    window_buckets: int = Field(default=30, ge=1, description="time buckets per window")
    derive_from_card: bool = True
    evaluator: Evaluator = Field(
        default="local",
        description="who asks for retrains: local = this process's monitor, "
        "fleet = Prometheus rules + Alertmanager (the monitor only evaluates and exports)",
    )
    models: dict[str, SloOverrides] = Field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """One SLO for one model: `observed` meets it when >= (kind "min") or <= (kind "max")."""

    slo: SloName
    kind: Literal["min", "max"]
    objective: float
    window_seconds: float
    min_samples: int
    source: str  # "config" | "default" | "model card (headroom ...)"

    def met(self, observed: float) -> bool:
        return observed >= self.objective if self.kind == "min" else observed <= self.objective


class Breach(TypedDict):
    """One breached SLO as it appears in the retrain webhook's `data.breaches`."""

    slo: str
    observed: float
    objective: float
    window_seconds: float
    samples: int


def objectives_for(
    figures: CardFigures | None, config: SloConfig, model: str | None = None
) -> list[Objective]:
    """The six objectives for one model whose student card records `figures` (None: no card).

    Precedence: a per-model override (`config.models[model]`) or an explicitly set global key
    (source "config"); else the default, unless the card's measured figure already misses it, in
    which case the objective is derived from the card with headroom: KL and ECE x2, agreement
    minus 2 points (source "model card (headroom ...)").
    """
    overrides = config.models.get(model) if model is not None else None
    explicit = config.model_fields_set
    ece_label_default = config.ece_label_max if config.ece_label_max is not None else config.ece_max
    specs: list[tuple[SloName, Literal["min", "max"], str, float]] = [
        ("agreement", "min", "agreement_min", config.agreement_min),
        ("kl_mean", "max", "kl_mean_max", config.kl_mean_max),
        ("ece_teacher", "max", "ece_max", config.ece_max),
        ("ece_label", "max", "ece_label_max", ece_label_default),
        ("p95_latency", "max", "p95_latency_max_seconds", config.p95_latency_max_seconds),
        ("drift_share", "max", "drift_share_max", config.drift_share_max),
    ]
    objectives = []
    for slo, kind, key, value in specs:
        override = getattr(overrides, key) if overrides is not None else None
        objective, source = value, "default"
        if override is not None:
            objective, source = override, "config"
        elif key in explicit or (slo == "ece_label" and "ece_max" in explicit):
            source = "config"
        elif config.derive_from_card:
            name = CARD_FIGURE.get(slo)
            measured = figures.measured(name) if figures is not None and name else None
            objective, source = _from_card(slo, value, measured)
        objectives.append(
            Objective(slo, kind, objective, config.window_seconds, config.min_samples, source)
        )
    return objectives


def _from_card(slo: SloName, default: float, measured: float | None) -> tuple[float, str]:
    if measured is None:
        return default, "default"
    if slo == "agreement" and measured < default:
        derived = max(measured - AGREEMENT_HEADROOM_POINTS, 0.0)
        return derived, f"model card (headroom -{AGREEMENT_HEADROOM_POINTS:g}: {measured:.4g})"
    if slo == "kl_mean" and measured > default:
        return KL_HEADROOM_FACTOR * measured, (
            f"model card (headroom x{KL_HEADROOM_FACTOR:g}: {measured:.4g})"
        )
    if slo in ("ece_teacher", "ece_label") and measured > default:
        return min(ECE_HEADROOM_FACTOR * measured, 1.0), (
            f"model card (headroom x{ECE_HEADROOM_FACTOR:g}: {measured:.4g})"
        )
    return default, "default"
