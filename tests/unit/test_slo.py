"""SLO config and per-model objectives (monitoring/slo.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kdgate.monitoring.slo import SloConfig, card_figure, objectives_for
from kdgate.service.settings import default_models_dir


def by_slo(objectives):
    return {o.slo: o for o in objectives}


def test_defaults_are_the_design_values() -> None:
    objectives = by_slo(objectives_for({}, SloConfig()))
    assert objectives["agreement"].objective == 0.95
    assert objectives["agreement"].kind == "min"
    assert objectives["kl_mean"].objective == 0.05
    assert objectives["ece_teacher"].objective == 0.05
    assert objectives["ece_label"].objective == 0.05
    assert objectives["p95_latency"].objective == 0.1
    assert objectives["drift_share"].objective == 0.5
    assert {o.source for o in objectives.values()} == {"default"}
    assert {o.window_seconds for o in objectives.values()} == {300}
    assert {o.min_samples for o in objectives.values()} == {200}


def test_card_worse_than_default_derives_objective_with_headroom() -> None:
    card = {"mean_kl": 0.08, "agreement": 0.94, "ece": 0.07}
    objectives = by_slo(objectives_for(card, SloConfig()))
    assert objectives["kl_mean"].objective == pytest.approx(0.16)
    assert objectives["kl_mean"].source.startswith("model card (headroom x2")
    assert objectives["agreement"].objective == pytest.approx(0.92)
    assert objectives["agreement"].source.startswith("model card (headroom -0.02")
    assert objectives["ece_label"].objective == pytest.approx(0.14)
    # The card's ECE is against labels; it says nothing about ECE against the teacher.
    assert objectives["ece_teacher"].objective == 0.05
    assert objectives["ece_teacher"].source == "default"


def test_card_better_than_default_keeps_default() -> None:
    objectives = by_slo(objectives_for({"mean_kl": 0.01, "agreement": 0.99}, SloConfig()))
    assert objectives["kl_mean"].objective == 0.05
    assert objectives["kl_mean"].source == "default"
    assert objectives["agreement"].objective == 0.95


def test_card_figures_under_a_validation_section_are_found() -> None:
    objectives = by_slo(objectives_for({"validation": {"mean_kl": 0.1}}, SloConfig()))
    assert objectives["kl_mean"].objective == pytest.approx(0.2)


def test_explicit_config_wins_over_card() -> None:
    config = SloConfig(kl_mean_max=0.03)
    objectives = by_slo(objectives_for({"mean_kl": 0.08}, config))
    assert objectives["kl_mean"].objective == 0.03
    assert objectives["kl_mean"].source == "config"


def test_per_model_override() -> None:
    config = SloConfig.model_validate({"models": {"digits": {"drift_share_max": 0.3}}})
    digits = by_slo(objectives_for({}, config, "digits"))
    other = by_slo(objectives_for({}, config, "other"))
    assert (digits["drift_share"].objective, digits["drift_share"].source) == (0.3, "config")
    assert (other["drift_share"].objective, other["drift_share"].source) == (0.5, "default")


def test_derivation_can_be_switched_off() -> None:
    objectives = by_slo(objectives_for({"mean_kl": 0.08}, SloConfig(derive_from_card=False)))
    assert objectives["kl_mean"].objective == 0.05


@pytest.mark.parametrize(
    "bad",
    [{"agreement_min": 1.5}, {"kl_mean_max": 0}, {"min_samples": 0}, {"unknown_key": 1}],
)
def test_nonsense_is_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        SloConfig.model_validate(bad)


def test_objective_met() -> None:
    objectives = by_slo(objectives_for({}, SloConfig()))
    assert objectives["agreement"].met(0.95) and not objectives["agreement"].met(0.94)
    assert objectives["kl_mean"].met(0.05) and not objectives["kl_mean"].met(0.051)


def test_the_real_student_card_is_read_from_its_validation_section() -> None:
    card = json.loads((default_models_dir() / "digits" / "student-v1.card.json").read_text())
    validation = card["metrics"]["validation"]
    assert card_figure(card["metrics"], "kl_mean") == validation["kl_mean_nats"]
    assert card_figure(card["metrics"], "agreement") == validation["agreement"]
    assert card_figure(card["metrics"], "ece_label") == validation["ece"]
    assert validation["kl_mean_nats"] != card["metrics"]["kl_mean_nats"]  # not the test split
    # The default pair meets every default on validation data: nothing is relaxed.
    objectives = by_slo(objectives_for(card["metrics"], SloConfig(), "digits"))
    assert {o.source for o in objectives.values()} == {"default"}
    # Had validation missed the default (the test split meeting it), validation decides.
    worse = {**card["metrics"], "validation": {**validation, "kl_mean_nats": 0.08}}
    derived = by_slo(objectives_for(worse, SloConfig(), "digits"))["kl_mean"]
    assert derived.objective == pytest.approx(0.16)
    assert derived.source.startswith("model card (headroom x2")
