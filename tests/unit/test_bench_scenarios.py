"""bench/scenarios.py: config generation, checked against kdgate's own settings model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench import scenarios
from bench.model import MODELS_DIR
from kdgate.service.settings import load_settings


def test_deep_merge_merges_mappings_replaces_the_rest_and_mutates_nothing() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    overrides = {"a": {"c": [3], "e": {"f": 2}}, "d": {"g": 1}}
    merged = scenarios.deep_merge(base, overrides)
    assert merged == {"a": {"b": 1, "c": [3], "e": {"f": 2}}, "d": {"g": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged["a"]["e"]["f"] = 99
    assert overrides["a"]["e"] == {"f": 2}


def test_fill_replaces_placeholders_at_any_depth() -> None:
    value = {"u": "{sidecar_url}/x", "l": [{"c": "{teacher_card}"}, 3], "n": 0.5}
    filled = scenarios.fill(value, {"sidecar_url": "http://h:1", "teacher_card": "/t.json"})
    assert filled == {"u": "http://h:1/x", "l": [{"c": "/t.json"}, 3], "n": 0.5}


def test_select_defaults_and_rejects_unknown_names() -> None:
    assert [s.name for s in scenarios.select(None)] == [
        "ceiling",
        "naive",
        "kdgate",
        "ceiling-2-workers",
        "kdgate-2-workers",
    ]
    assert [s.name for s in scenarios.select(["kdgate", "ceiling"])] == ["kdgate", "ceiling"]
    with pytest.raises(ValueError, match="nope"):
        scenarios.select(["nope"])


def test_scenario_names_are_unique() -> None:
    names = [s.name for s in scenarios.ALL]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "scenario", [s for s in scenarios.ALL if s.server == "kdgate"], ids=lambda s: s.name
)
def test_every_kdgate_scenario_config_is_accepted_by_kdgate(
    scenario: scenarios.Scenario, tmp_path: Path
) -> None:
    student = MODELS_DIR / "student-v1.card.json"
    teacher = MODELS_DIR / "teacher.card.json"
    if not (student.exists() and teacher.exists()):
        pytest.skip("models/digits cards not built yet")
    config = scenarios.kdgate_config(
        scenario,
        port=12345,
        student_card=str(student),
        placeholders={
            "student_card": str(student),
            "teacher_card": str(teacher),
            "sidecar_url": "http://127.0.0.1:9",
        },
    )
    path = tmp_path / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    assert settings.server.port == 12345
    (model,) = settings.models
    assert model.name == "digits"
    expected_fraction = scenario.model.get("traffic", {}).get("shadow_fraction", 0.0)
    assert model.traffic.shadow_fraction == expected_fraction
    assert (model.teacher is None) == ("teacher" not in scenario.model)


def test_a_workers_scenario_sets_server_workers_and_the_others_do_not() -> None:
    by_name = {s.name: s for s in scenarios.ALL}
    config = scenarios.kdgate_config(
        by_name["kdgate-2-workers"], port=1234, student_card="s.json", placeholders={}
    )
    assert config["server"] == {"host": "127.0.0.1", "port": 1234, "workers": 2}
    single = scenarios.kdgate_config(
        by_name["kdgate"], port=1234, student_card="s.json", placeholders={}
    )
    assert "workers" not in single["server"]
