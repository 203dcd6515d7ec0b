"""The traffic file: parsing and validation, precedence over the config, atomic writes, and
the snapshot key the watcher compares (a ConfigMap's symlink swap included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kdgate.service.settings import Settings, StudentSettings, load_settings
from kdgate.service.traffic_store import TrafficDocument, TrafficEntry, TrafficStore
from tests.support.traffic import write_admin_config


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_admin_config(tmp_path, {"1": 90, "2": 10}))


def cards(settings: Settings) -> dict[str, Path]:
    return {s.version: s.card for s in settings.models[0].students}


def test_yaml_with_relative_cards_and_versions_left_out_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "traffic.yaml"
    path.parent.mkdir()
    path.write_text(
        "models:\n"
        "  digits:\n"
        "    versions: [{version: '1', card: a/v1.card.json}, {version: '2', card: /m/v2.json}]\n"
        "    weights: {'2': 100}\n"
        "    shadow_fraction: 0.2\n"
    )
    entry = TrafficStore(path).read().models["digits"]  # type: ignore[union-attr]
    assert entry.cards() == {"1": path.parent / "a/v1.card.json", "2": Path("/m/v2.json")}
    assert entry.weights == {"1": 0, "2": 100}
    assert entry.traffic.sticky_header == "x-kdgate-route-key"
    assert entry.shadow_fraction == 0.2 and entry.previous_weights is None


def test_the_admin_state_file_spelling_reads_as_the_same_entry(tmp_path: Path) -> None:
    old = {
        "schema_version": 1,
        "models": {
            "digits": {
                "students": [{"version": "1", "card": "/m/v1.json"}],
                "traffic": {"weights": {"1": 100}, "shadow_fraction": 0.3},
                "previous_weights": {"1": 100},
            }
        },
    }
    (tmp_path / "traffic.json").write_text(json.dumps(old))
    entry = TrafficStore(tmp_path / "traffic.json").read().models["digits"]  # type: ignore[union-attr]
    assert entry == TrafficEntry(
        versions=[StudentSettings(version="1", card=Path("/m/v1.json"))],
        weights={"1": 100},
        shadow_fraction=0.3,
        previous_weights={"1": 100},
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "models: {digits: {versions: [{version: '1', card: /a}], weights: {'1': 90}}}",
            "sum to 100",
        ),
        (
            "models: {digits: {versions: [{version: '1', card: /a}], weights: {'1': 50, '7': 50}}}",
            "unknown versions ['7']",
        ),
        ("models: {digits: {versions: [], weights: {}}}", "models.digits.versions"),
        ("models: {digits: {versions: [{version: '1', card: /a}], shadow_fraction: 2}}", "1"),
        ("models: {digits: {versions: [{version: '1', card: /a}], weight: {}}}", "weight"),
        ("models: [1, 2", "not YAML/JSON"),
        ("- just a list", "not a mapping"),
    ],
)
def test_an_invalid_file_is_an_error_that_names_it_and_the_problem(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "traffic.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="is not a valid traffic file") as caught:
        TrafficStore(path).read()
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_no_file_serves_the_config_with_nothing_to_report(
    tmp_path: Path, settings: Settings
) -> None:
    restored = TrafficStore(tmp_path / "none.yaml").restore(settings)
    assert restored.settings == settings and restored.differences == {}
    assert restored.document.models["digits"] == TrafficEntry.of(settings.models[0])


def test_the_file_wins_over_an_edited_config_and_names_every_key_that_differs(
    tmp_path: Path, settings: Settings
) -> None:
    store = TrafficStore(tmp_path / "traffic.json")
    saved = TrafficEntry(
        versions=settings.models[0].students,
        weights={"1": 0, "2": 100},
        previous_weights={"1": 90, "2": 10},
    )
    store.write(TrafficDocument(models={"digits": saved, "cats": saved}))
    # The config gains version 3 and a shadow fraction of 0.2 after the admin change.
    v3 = StudentSettings(version="3", card=tmp_path / "v3.card.json")
    model = settings.models[0]
    edited = model.model_copy(
        update={
            "students": [*model.students, v3],
            "traffic": model.traffic.model_copy(update={"shadow_fraction": 0.2}),
        }
    )
    restored = store.restore(settings.model_copy(update={"models": [edited]}))
    (served,) = restored.settings.models
    assert [s.version for s in served.students] == ["1", "2"]
    assert served.traffic.weights == {"1": 0, "2": 100} and served.traffic.shadow_fraction == 0.1
    assert served.teacher == model.teacher
    assert restored.differences == {
        "digits": [
            "students: config ['1', '2', '3'], file ['1', '2']",
            "weights: config {'1': 90, '2': 10}, file {'2': 100}",
            "shadow_fraction: config 0.2, file 0.1",
        ]
    }
    # The other model's entry is kept for the next write; the previous weights too.
    assert set(restored.document.models) == {"digits", "cats"}
    assert restored.document.models["digits"].previous_weights == {"1": 90, "2": 10}


def test_an_entry_that_does_not_fit_the_configured_model_stops_the_start(
    tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "traffic.yaml"
    path.write_text(
        "models: {digits: {versions: [{version: teacher, card: /a}], weights: {teacher: 100}}}"
    )
    with pytest.raises(ValueError, match="reserved for the teacher"):
        TrafficStore(path).restore(settings)


def test_write_is_one_whole_file_in_the_symlink_target_directory(
    tmp_path: Path, settings: Settings
) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "traffic.yaml"
    link.symlink_to(tmp_path / "real" / "traffic.yaml")
    store = TrafficStore(link)
    first = TrafficDocument(models={"digits": TrafficEntry.of(settings.models[0])})
    store.write(first)
    second = TrafficDocument(
        models={"digits": first.models["digits"].model_copy(update={"shadow_fraction": 0.5})}
    )
    store.write(second)
    assert link.is_symlink() and os.listdir(tmp_path / "real") == ["traffic.yaml"]
    assert yaml.safe_load(link.read_text())["models"]["digits"]["weights"] == {"1": 90, "2": 10}
    assert store.read() == second


def test_a_failed_write_keeps_the_old_file(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TrafficStore(tmp_path / "state" / "traffic.json")
    old = TrafficDocument(models={"digits": TrafficEntry.of(settings.models[0])})
    store.write(old)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        store.write(TrafficDocument())
    monkeypatch.undo()
    assert os.listdir(tmp_path / "state") == ["traffic.json"] and store.read() == old


def test_the_snapshot_key_follows_a_configmap_style_symlink_swap(tmp_path: Path) -> None:
    """kubelet: `traffic.yaml -> ..data/traffic.yaml`, `..data -> ..<timestamp>`; an update
    writes a new timestamped directory and renames a new `..data` link over the old one."""
    first, second = tmp_path / "..2026_12_04_1", tmp_path / "..2026_12_04_2"
    for directory, fraction in ((first, "0.1"), (second, "0.2")):
        directory.mkdir()
        (directory / "traffic.yaml").write_text(f"models: {{}}  # {fraction}\n")
        os.utime(directory / "traffic.yaml", ns=(10**18, 10**18))  # same mtime, same size
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "traffic.yaml").symlink_to("..data/traffic.yaml")
    store = TrafficStore(tmp_path / "traffic.yaml")
    before = store.snapshot()
    assert before.key[0] == str(first / "traffic.yaml")
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    after = store.snapshot()
    assert after.key != before.key and after.data == b"models: {}  # 0.2\n"
    assert store.snapshot().key == after.key  # stable while nothing changes
    (tmp_path / "traffic.yaml").unlink()
    assert store.snapshot().data is None


def test_read_only_is_the_flag_or_a_directory_this_process_cannot_write(tmp_path: Path) -> None:
    assert TrafficStore(tmp_path / "traffic.yaml").writable() is None
    why = TrafficStore(tmp_path / "traffic.yaml", read_only=True).writable()
    assert why is not None and "traffic.read_only" in why
