"""The `kdgate` command as a user runs it (a subprocess): version, help, one-line errors.

Operator mistakes (a bad config, a missing optional part) must end in one line on stderr that
names what to fix, and exit code 2; never a traceback, never a secret.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from stack.process import without_kdgate_env
from tests.support.tiny_model import write_config

REPO = Path(__file__).resolve().parents[2]
TOKEN = "admin-token-7f3a9c21e5"
WEBHOOK_SECRET = "whsec_c2VjcmV0LWJ5dGVzLWZvci10ZXN0aW5nLTEyMzQ="


def kdgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdgate.service.cli", *args],
        cwd=REPO,
        env=without_kdgate_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def with_secrets(config: Path, **sections: object) -> Path:
    """`config` plus an admin token, a webhook with a secret and `sections` merged in."""
    data = yaml.safe_load(config.read_text())
    data["admin"] = {"token": TOKEN, "state_dir": str(config.parent / "state")}
    data["webhook"] = {"url": "http://127.0.0.1:9/hook", "secret": WEBHOOK_SECRET}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    config.write_text(yaml.safe_dump(data))
    return config


def assert_one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert TOKEN not in result.stderr + result.stdout
    assert WEBHOOK_SECRET not in result.stderr + result.stdout


def test_version_is_the_package_version() -> None:
    result = kdgate("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kdgate {importlib.metadata.version('kdgate')}"


def test_help_describes_the_command_without_internal_notes() -> None:
    result = kdgate("--help")
    assert result.returncode == 0
    assert "knowledge-distilled" in result.stdout
    assert "join as further subcommands" not in result.stdout
    for command in ("serve", "config", "rules", "distill", "loadgen", "retrain-worker"):
        assert command in result.stdout


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "kdgate.yaml"
    config.write_text(f"admin:\n  token: {TOKEN}\nserver:\n  port: [8000\n  host: x\n")
    result = kdgate("serve", "--config", str(config))
    assert_one_line_error(result, str(config), "YAML syntax error", "line ")


def test_an_unknown_key_names_its_path(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path), server={"max_in_flite": 10})
    result = kdgate("serve", "--config", str(config))
    assert_one_line_error(result, str(config), "server.max_in_flite", "Extra inputs")


def test_a_wrong_type_names_its_path(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path), server={"max_in_flight": "lots"})
    result = kdgate("config", "check", str(config))
    assert_one_line_error(result, str(config), "server.max_in_flight", "valid integer")


def test_a_secret_of_the_wrong_type_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path), server={"port": "eighty"})
    data = yaml.safe_load(config.read_text())
    data["admin"]["token"] = 12345  # a wrong type: pydantic's own message would echo the input
    config.write_text(yaml.safe_dump(data))
    result = kdgate("config", "check", str(config))
    assert_one_line_error(result, "admin.token", "server.port")
    assert "12345" not in result.stderr


def test_an_environment_override_is_named(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path))
    result = kdgate("config", "check", str(config), env={"KDGATE_SERVER__PORT": "http"})
    assert_one_line_error(result, "server.port", "KDGATE_SERVER__PORT")


def test_a_missing_card_file_names_its_key(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path))
    (tmp_path / "models" / "student-v1.card.json").unlink()
    result = kdgate("serve", "--config", str(config))
    assert_one_line_error(result, str(config), "models[0].students[0].card", "no such file")


@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_provider_onnxruntime_lacks_fails_at_start_naming_the_available_ones(
    tmp_path: Path, command: str
) -> None:
    config = with_secrets(write_config(tmp_path))
    data = yaml.safe_load(config.read_text())
    data["models"][0]["students"][0]["providers"] = [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    config.write_text(yaml.safe_dump(data))
    args = (
        ("serve", "--config", str(config))
        if command == "serve"
        else ("config", "check", str(config))
    )
    result = kdgate(*args)
    assert_one_line_error(
        result,
        str(config),
        "models[0].students[0].providers: CUDAExecutionProvider not available",
        "available: ",
        "CPUExecutionProvider",
    )


def test_a_missing_card_of_a_weight_0_version_is_no_config_error(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path, {"1": 100, "2": 0}))
    (tmp_path / "models" / "student-v2.card.json").unlink()
    result = kdgate("config", "check", str(config))
    assert result.returncode == 0, result.stderr


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = kdgate("config", "check", str(tmp_path / "absent.yaml"))
    assert_one_line_error(result, "absent.yaml", "no such file")


def test_config_check_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    config = with_secrets(write_config(tmp_path), server={"max_in_flight": 7})
    result = kdgate("config", "check", str(config), env={"KDGATE_SERVER__LOG_FORMAT": "json"})
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["server"]["max_in_flight"] == 7  # from the file
    assert effective["server"]["log_format"] == "json"  # from the environment
    assert effective["server"]["request_timeout_seconds"] == 30.0  # a default
    assert effective["admin"]["token"] == "**********"
    assert effective["webhook"]["secret"] == "**********"
    assert TOKEN not in result.stdout and WEBHOOK_SECRET not in result.stdout


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [(["distill", "--help"], "torch", "train"), (["distill", "--help"], "sklearn", "train")],
)
def test_a_missing_extra_names_what_to_install(argv: list[str], blocked: str, extra: str) -> None:
    # A finder in front of the others makes `import <blocked>` fail as if it were not installed.
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        from kdgate.service.cli import main
        sys.exit(main({argv!r}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=without_kdgate_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, f"pip install 'kdgate[{extra}]'", blocked)


@pytest.mark.parametrize("workers", ["0", "65", "two"])
def test_a_bad_number_of_workers_is_a_usage_error(workers: str) -> None:
    result = kdgate("serve", "--workers", workers)
    assert result.returncode == 2
    assert "expected a number of workers from 1 to 64" in result.stderr


def test_a_taken_port_with_several_workers_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, port=port, workers=2)
        result = kdgate("serve", "--config", str(config))
    assert result.returncode == 1
    assert f"kdgate: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
