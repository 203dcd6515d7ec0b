"""The traffic state file: atomic writes, reading back, restoring over the config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from kdgate.service.settings import Settings, StudentSettings, TrafficSettings, load_settings
from kdgate.service.traffic_store import FILE_NAME, SavedModel, SavedTraffic, TrafficStore
from tests.support.traffic import write_admin_config


def saved(weights: dict[str, int], cards: dict[str, Path]) -> SavedTraffic:
    entry = SavedModel(
        students=[StudentSettings(version=v, card=c) for v, c in cards.items()],
        traffic=TrafficSettings(weights=weights, shadow_fraction=0.3),
        previous_weights={"1": 100},
    )
    return SavedTraffic(models={"digits": entry})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_admin_config(tmp_path, {"1": 100}))


def test_no_file_reads_as_empty_and_restores_nothing(tmp_path: Path, settings: Settings) -> None:
    store = TrafficStore(tmp_path / "nowhere")
    assert store.read() == SavedTraffic()
    assert store.restore(settings) == settings


def test_write_is_a_whole_file_replace_with_nothing_left_over(tmp_path: Path) -> None:
    store = TrafficStore(tmp_path / "state")
    first = saved({"1": 100}, {"1": tmp_path / "a.card.json"})
    store.write(first)
    second = saved({"1": 40, "2": 60}, {"1": tmp_path / "a.json", "2": tmp_path / "b.json"})
    store.write(second)
    assert os.listdir(tmp_path / "state") == [FILE_NAME]
    assert json.loads(store.path.read_text())["models"]["digits"]["traffic"]["weights"] == {
        "1": 40,
        "2": 60,
    }
    assert TrafficStore(tmp_path / "state").read() == second


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TrafficStore(tmp_path)
    old = saved({"1": 100}, {"1": tmp_path / "a.json"})
    store.write(old)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        store.write(saved({"1": 50, "2": 50}, {"1": tmp_path / "a", "2": tmp_path / "b"}))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [FILE_NAME]
    assert TrafficStore(tmp_path).read() == old


def test_a_broken_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"schema_version": 1, "models": {"digits": {}}}')
    with pytest.raises(ValueError, match=r"traffic\.json is not a kdgate traffic state file"):
        TrafficStore(tmp_path).read()


def test_saved_models_override_the_config_and_say_so(
    tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = settings.models[0].students[0].card
    v2 = tmp_path / "v2.card.json"
    store = TrafficStore(tmp_path / "state")
    store.write(saved({"1": 10, "2": 90}, {"1": v1, "2": v2}))
    with caplog.at_level(logging.WARNING):
        restored = TrafficStore(tmp_path / "state").restore(settings)
    (model,) = restored.models
    assert [(s.version, s.card) for s in model.students] == [("1", v1), ("2", v2)]
    assert model.traffic.weights == {"1": 10, "2": 90} and model.traffic.shadow_fraction == 0.3
    assert model.teacher == settings.models[0].teacher
    assert "restored from" in caplog.text and "override the config" in caplog.text


def test_a_saved_split_naming_unknown_versions_is_refused(
    tmp_path: Path, settings: Settings
) -> None:
    v1 = settings.models[0].students[0].card
    entry = SavedModel(
        students=[StudentSettings(version="1", card=v1)],
        traffic=TrafficSettings(weights={"1": 50, "9": 50}),
    )
    TrafficStore(tmp_path).write(SavedTraffic(models={"digits": entry}))
    with pytest.raises(ValueError, match="saved traffic of model 'digits' is invalid"):
        TrafficStore(tmp_path).restore(settings)
