"""The wheel as a user gets it: one import name, and a `kdgate serve` that works with no config.

The wheel is built from a copy of the sources (so no stale `build/` of the checkout leaks in) and
installed without dependencies into a fresh virtual environment that has no pip and no access
to the repository. Its third-party dependencies come from this test run's own site-packages,
put on PYTHONPATH: that directory's .pth files (an editable kdgate install among them) are not
processed for PYTHONPATH entries, so only the installed wheel can provide `kdgate`. Every child
runs in a temporary directory, so the repository root is never on sys.path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stack.process import KDGATE, listening, without_kdgate_env

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "kdgate", "service", "monitoring", "distill", "models")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with only the kdgate wheel installed; yields its python."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                source / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], tmp)
    (wheel,) = wheels.glob("kdgate-*.whl")
    env_dir = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], tmp)
    python = env_dir / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp)
    yield python


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without KDGATE_* settings and without this run's PYTHONPATH (it points
    at the checkout), plus `extra`."""
    env = without_kdgate_env()
    env.pop("PYTHONPATH", None)
    return {**env, **extra}


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command,
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done


def dependencies() -> dict[str, str]:
    """PYTHONPATH giving the venv this run's third-party packages (and nothing from the repo)."""
    return {"PYTHONPATH": sysconfig.get_paths()["purelib"]}


def installed(python: Path) -> Path:
    """The installed package's folder in the venv."""
    return next((python.parent.parent / "lib").glob("python3*/site-packages/kdgate"))


def test_the_wheel_claims_only_the_kdgate_import_name(venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, sys, kdgate.service, kdgate.monitoring.slo\n"
        "print(kdgate.service.__file__)\n"
        "print(sorted(n for n in ('service', 'monitoring', 'distill', 'models')"
        " if importlib.util.find_spec(n) is not None))\n"
    )
    out = run([str(venv), "-c", probe], tmp_path, **dependencies()).stdout.splitlines()
    assert out[0].startswith(str(installed(venv))), out
    assert out[1] == "[]"
    top_level = (
        next(installed(venv).parent.glob("kdgate-*.dist-info")) / "top_level.txt"
    ).read_text()
    assert top_level.split() == ["kdgate"]


def test_kdgate_serve_with_no_config_serves_the_default_pair(venv: Path, tmp_path: Path) -> None:
    command = [str(venv), "-m", "kdgate", "serve", "--port", "0"]
    env = clean_env(**dependencies())
    with listening(command, KDGATE, env=env, cwd=tmp_path, deadline_seconds=90) as server:
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        row = [0.0] * 64
        request = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}
        answer = httpx.post(f"{server.url}/v2/models/digits/infer", json=request, timeout=10)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["shape"] == [1, 10] and len(output["data"]) == 10


def test_without_the_default_models_serve_names_the_setting_to_write(
    venv: Path, tmp_path: Path
) -> None:
    models = installed(venv) / "models"
    hidden = models.with_name("models.hidden")
    models.rename(hidden)
    try:
        done = subprocess.run(
            [str(venv), "-m", "kdgate", "serve", "--port", "0"],
            cwd=tmp_path,
            env=clean_env(**dependencies()),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        hidden.rename(models)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "models[0].students[0].card: no such file" in last, done.stderr[-3000:]
    assert "--config FILE" in last, last
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
