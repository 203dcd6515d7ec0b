"""Settings: file + environment precedence, card path resolution, validators."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kdgate.service.settings import Settings, default_models_dir, load_settings


def write(tmp_path: Path, config: dict[str, object]) -> Path:
    path = tmp_path / "conf" / "kdgate.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


MODEL = {"name": "digits", "students": [{"version": "1", "card": "m/student-v1.card.json"}]}


def test_embedded_default_points_at_the_repository_models() -> None:
    settings = load_settings(environ={})
    (model,) = settings.models
    assert model.students[0].card == default_models_dir() / "digits" / "student-v1.card.json"
    assert model.traffic.weights == {"1": 100}
    assert settings.server.port == 8000 and settings.server.max_body_bytes == 4194304


def test_card_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"models": [MODEL]}))
    assert settings.models[0].students[0].card == tmp_path / "conf" / "m" / "student-v1.card.json"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"server": {"port": 9000, "host": "0.0.0.0"}, "models": [MODEL]})
    monkeypatch.setenv("KDGATE_SERVER__PORT", "9100")
    monkeypatch.setenv("KDGATE_SLO__ECE_MAX", "0.2")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"  # untouched keys of the file survive
    assert settings.slo.ece_max == 0.2


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"server": {"port": 9001}, "models": [MODEL]})
    monkeypatch.setenv("KDGATE_CONFIG", str(path))
    assert load_settings().server.port == 9001


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"traffic": {"shadow_fraction": 1.5}}, "less than or equal to 1"),
        ({"traffic": {"shadow_fraction": -0.1}}, "greater than or equal to 0"),
        ({"traffic": {"weights": {"1": 90}}}, "sum to 100"),
        ({"traffic": {"weights": {"1": 50, "2": 50}}}, "unknown versions ['2']"),
        ({"students": [{"version": "1", "card": "a"}, {"version": "1", "card": "b"}]},
         "duplicate student versions"),
        ({"students": [{"version": "1", "card": "a"}, {"version": "2", "card": "b"}]},
         "traffic.weights must say"),
        ({"teacher": {"url": "http://t"}}, "needs 'model'"),
        ({"teacher": {}}, "exactly one of"),
        ({"teacher": {"url": "http://t", "model": "t", "providers": ["CPUExecutionProvider"]}},
         "['providers'] apply to a local teacher"),
        ({"students": [{"version": "1", "card": "a",
                        "provider_options": {"CUDAExecutionProvider": {}}}]},
         "provider_options names ['CUDAExecutionProvider'], not in providers"),
        ({"students": [{"version": "1", "card": "a", "providers": ["A", "A"]}]},
         "lists a provider twice"),
        ({"students": [{"version": "1", "card": "a", "providers": []}]}, "at least 1 item"),
        ({"students": [{"version": "1", "card": "a",
                        "session_options": {"graph_optimization_level": "fast"}}]},
         "graph_optimization_level"),
        ({"students": [{"version": "1", "card": "a", "session_options": {"intra_op_threads": -1}}]},
         "greater than or equal to 0"),
    ],
)  # fmt: skip
def test_model_validators_reject_nonsense(
    tmp_path: Path, override: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, {"models": [{**MODEL, **override}]}))


@pytest.mark.parametrize("secret", ["changeme", "CHANGEME", "  ", "<your-secret>", "secret"])
def test_placeholder_webhook_secret_is_rejected(tmp_path: Path, secret: str) -> None:
    config = {"models": [MODEL], "webhook": {"url": "http://h", "secret": secret}}
    with pytest.raises(ValidationError, match="placeholder"):
        load_settings(write(tmp_path, config))


def test_webhook_url_needs_a_secret() -> None:
    with pytest.raises(ValidationError, match="deliveries are signed"):
        Settings(webhook={"url": "http://h"})  # type: ignore[arg-type]


def test_unknown_keys_and_bad_server_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="max_body_bytes"):
        load_settings(write(tmp_path, {"server": {"max_body_bytes": 0}, "models": [MODEL]}))
    with pytest.raises(ValidationError, match="Extra inputs"):
        load_settings(write(tmp_path, {"sever": {}, "models": [MODEL]}))


def test_sticky_header_is_lower_cased(tmp_path: Path) -> None:
    model = {**MODEL, "traffic": {"sticky_header": "X-User"}}
    assert load_settings(write(tmp_path, {"models": [model]})).models[0].traffic.sticky_header == (
        "x-user"
    )


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Content-Length", "framing"),
        ("Transfer-Encoding", "framing"),
        ("Host", "framing"),
        ("Connection", "framing"),
        ("keep-alive", "framing"),
        ("x" * 65, "over 64 characters"),
        ("x" * 10_000, "over 64 characters"),
    ],
)
def test_sticky_header_refuses_connection_and_framing_headers_and_long_names(
    tmp_path: Path, header: str, reason: str
) -> None:
    model = {**MODEL, "traffic": {"sticky_header": header}}
    with pytest.raises(ValidationError, match=reason):
        load_settings(write(tmp_path, {"models": [model]}))


def test_sticky_header_of_64_characters_is_fine(tmp_path: Path) -> None:
    model = {**MODEL, "traffic": {"sticky_header": "x-" + "k" * 62}}
    assert load_settings(write(tmp_path, {"models": [model]})).models[0].traffic.sticky_header


def test_providers_and_session_options_per_student_and_teacher(tmp_path: Path) -> None:
    model = {
        **MODEL,
        "students": [
            {
                "version": "1",
                "card": "s.json",
                "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                "provider_options": {"CUDAExecutionProvider": {"device_id": 1}},
                "session_options": {
                    "intra_op_threads": 4, "graph_optimization_level": "ORT_ENABLE_BASIC"
                },
            }
        ],
        "teacher": {"card": "t.json", "providers": ["OpenVINOExecutionProvider"],
                    "session_options": {"execution_mode": "ORT_PARALLEL"}},
    }  # fmt: skip
    (got,) = load_settings(write(tmp_path, {"models": [model]})).models
    student = got.students[0]
    assert student.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert student.provider_options == {"CUDAExecutionProvider": {"device_id": 1}}
    assert student.session_options.intra_op_threads == 4
    assert student.session_options.graph_optimization_level == "enable_basic"
    assert got.teacher is not None and got.teacher.providers == ["OpenVINOExecutionProvider"]
    assert got.teacher.session_options.execution_mode == "parallel"


def test_cpu_is_the_default_provider() -> None:
    (model,) = Settings().models
    assert model.students[0].providers == ["CPUExecutionProvider"]
    assert model.teacher is not None and model.teacher.providers == ["CPUExecutionProvider"]
    assert model.students[0].session_options.intra_op_threads is None  # server's default
