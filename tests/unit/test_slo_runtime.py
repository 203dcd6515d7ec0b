"""service/slo_runtime.py: objectives per model, the drift reference, the request-path tap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdgate.monitoring.card_figures import CardFigures
from kdgate.monitoring.drift import InputBuffer
from kdgate.monitoring.slo import SloConfig, objectives_for
from kdgate.service.settings import Settings, default_models_dir, load_settings
from kdgate.service.slo_runtime import _tap, loosest, model_objectives, reference_path


def test_default_pair_keeps_every_default_objective() -> None:
    ((name, objectives),) = model_objectives(Settings()).items()
    assert name == "digits"
    assert [(o.slo, o.objective, o.source) for o in objectives] == [
        (o.slo, o.objective, "default") for o in objectives_for(None, SloConfig())
    ]


def test_loosest_objective_across_student_cards() -> None:
    strict = objectives_for(None, SloConfig())
    lax = objectives_for(CardFigures(kl_mean_nats=0.2, agreement=0.9), SloConfig())
    chosen = {o.slo: o for o in loosest([strict, lax])}
    assert chosen["kl_mean"].objective == pytest.approx(0.4)
    assert chosen["agreement"].objective == pytest.approx(0.88)
    assert chosen["p95_latency"].objective == 0.1


def test_reference_is_beside_the_first_students_card() -> None:
    (model,) = Settings().models
    assert reference_path(model, "reference.npz") == default_models_dir() / "digits/reference.npz"
    assert reference_path(model, "/abs/ref.npz") == Path("/abs/ref.npz")


def test_tap_buffers_matching_matrices_only() -> None:
    buffer = InputBuffer(8, 4)
    tap = _tap(buffer, 4)
    tap(
        [
            {"input": np.ones((3, 4), np.float32)},
            {"input": np.ones((3, 5), np.float32)},  # another width: not this model's inputs
            {"input": np.ones(4, np.float32)},  # not a matrix
            {"input": np.full((2, 4), 2, np.float32)},
        ]
    )
    assert len(buffer) == 5
    np.testing.assert_array_equal(buffer.snapshot()[-2:], np.full((2, 4), 2, np.float32))


def test_webhook_secret_from_the_environment_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "s3cr3t-from-the-environment"
    monkeypatch.setenv("KDGATE_WEBHOOK__URL", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("KDGATE_WEBHOOK__SECRET", secret)
    settings = load_settings(environ={})
    assert settings.webhook.secret is not None
    assert settings.webhook.secret.get_secret_value() == secret
    assert secret not in repr(settings) and secret not in str(settings)
    assert secret not in settings.model_dump_json()


def test_webhook_url_without_a_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDGATE_WEBHOOK__URL", "http://127.0.0.1:9/hook")
    with pytest.raises(ValueError, match=r"webhook\.secret"):
        load_settings(environ={})
