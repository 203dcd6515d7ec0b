"""Settings of shadowing, teachers, feedback and capture (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kdgate.service.settings import Settings


def model(**overrides: Any) -> dict[str, Any]:
    return {"name": "digits", "students": [{"version": "1", "card": "s.json"}], **overrides}


def test_a_student_version_named_teacher_is_rejected() -> None:
    with pytest.raises(ValidationError, match="reserved for the teacher"):
        Settings(models=[model(students=[{"version": "teacher", "card": "s.json"}])])


def test_remote_teacher_options_and_defaults() -> None:
    teacher = {
        "url": "http://127.0.0.1:8001",
        "model": "digits-teacher",
        "timeout_seconds": 0.5,
        "max_batch": 16,
        "breaker": {"failure_threshold": 3, "cooldown_seconds": 2},
    }
    settings = Settings(models=[model(teacher=teacher)])
    got = settings.models[0].teacher
    assert got is not None
    assert (got.timeout_seconds, got.max_batch, got.intra_op_threads) == (0.5, 16, 1)
    assert (got.breaker.failure_threshold, got.breaker.cooldown_seconds) == (3, 2.0)
    assert settings.feedback.max_size == 50_000 and settings.feedback.ttl_seconds == 3600
    assert settings.shadow.capture.dir is None


@pytest.mark.parametrize(
    "bad",
    [
        {"models": [model(teacher={"card": "t.json", "timeout_seconds": 0})]},
        {"models": [model(teacher={"card": "t.json", "breaker": {"failure_threshold": 0}})]},
        {"models": [model(traffic={"shadow_fraction": 1.5})]},
        {"shadow": {"queue_size": 0}},
        {"shadow": {"capture": {"dir": "c", "max_rows": 10, "segment_rows": 11}}},
        {"feedback": {"ttl_seconds": 0}},
        {"feedback": {"max_size": 0}},
    ],
)
def test_nonsense_is_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**{"models": [model()], **bad})


def test_environment_overrides_nested_shadow_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDGATE_SHADOW__CAPTURE__DIR", "/tmp/capture")
    monkeypatch.setenv("KDGATE_FEEDBACK__TTL_SECONDS", "60")
    settings = Settings(models=[model()])
    assert settings.shadow.capture.dir == Path("/tmp/capture")
    assert settings.feedback.ttl_seconds == 60


def test_the_old_fidelity_window_key_is_refused_with_the_one_to_set() -> None:
    with pytest.raises(ValidationError, match=r"slo\.window_seconds"):
        Settings.model_validate({"shadow": {"window_seconds": 60}})
