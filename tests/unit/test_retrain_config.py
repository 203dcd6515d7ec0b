from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kdgate.service.retrain_app import main
from kdgate.service.retrain_config import CommandJob, DistillJob, load_worker_settings
from tests.support.retrain_worker import SECRET, write_worker_config
from tests.support.traffic import TOKEN

MODELS = {
    "digits": {"kind": "distill", "teacher_card": "models/teacher.card.json", "epochs": 5},
    "tabular": {
        "kind": "command",
        "command": ["python", "train.py"],
        "teacher": "tabular/teacher.onnx",
        "sample": "/data/sample.npz",
    },
}


def test_a_config_file_with_both_kinds_and_paths_relative_to_it(tmp_path: Path) -> None:
    settings = load_worker_settings(
        write_worker_config(tmp_path, gateway_url="http://127.0.0.1:8000/", models=MODELS)
    )
    digits, tabular = settings.models["digits"], settings.models["tabular"]
    assert isinstance(digits, DistillJob) and isinstance(tabular, CommandJob)
    assert digits.teacher_card == tmp_path / "models" / "teacher.card.json"
    assert digits.epochs == 5
    assert tabular.teacher == tmp_path / "tabular" / "teacher.onnx"
    assert tabular.sample == Path("/data/sample.npz")  # absolute stays
    assert tabular.cwd == tmp_path  # the command runs beside its config
    assert settings.work_dir == tmp_path / "work"
    assert settings.gateway.url == "http://127.0.0.1:8000"


def test_secrets_come_from_the_environment_and_are_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_worker_config(tmp_path, gateway_url="http://127.0.0.1:8000", models=MODELS)
    other_secret = "whsec_" + "QUJD" * 8
    monkeypatch.setenv("KDGATE_RETRAIN_SECRET", other_secret)
    monkeypatch.setenv("KDGATE_RETRAIN_GATEWAY__TOKEN", "token-from-the-environment-123")
    settings = load_worker_settings(path)
    assert settings.secret.get_secret_value() == other_secret
    assert settings.gateway.token.get_secret_value() == "token-from-the-environment-123"
    shown = repr(settings) + str(settings)
    assert other_secret not in shown and "token-from-the-environment" not in shown


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"secret": "changeme"}, "whsec_"),
        ({"secret": "whsec_QUJD"}, "at least 24"),
        ({"gateway": {"url": "http://h:1", "token": "changeme"}}, "placeholder"),
        ({"gateway": {"url": "ftp://h", "token": TOKEN}}, "URL of the gateway"),
        ({"rollout": {"candidate": "9"}}, "set by the worker"),
        ({"models": {"m": {"kind": "shell", "command": ["x"]}}}, "kind"),
        ({"models": {"m": {"kind": "command", "command": [], "teacher": "t"}}}, "at least 1"),
        ({"models": {}}, "at least 1"),
    ],
)
def test_nonsense_is_refused(tmp_path: Path, change: dict[str, object], problem: str) -> None:
    path = write_worker_config(tmp_path, gateway_url="http://127.0.0.1:8000", models=MODELS)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **change}))
    with pytest.raises(ValidationError, match=problem):
        load_worker_settings(path)


def test_a_bad_config_is_one_line_without_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_worker_config(
        tmp_path, gateway_url="http://127.0.0.1:8000", models=MODELS, tolerance_seconds=-1
    )
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tolerance_seconds" in err and err.count("\n") == 1
    assert SECRET not in err and TOKEN not in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err
