"""The wheel the serving image installs carries the code and the runbooks the gateway serves.

The image (deploy/Dockerfile) copies a few folders and runs `pip install .`: here the same
COPY lines (those before the install) fill a directory, from which setuptools builds the wheel
it would install (no Docker engine needed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def copies_before_install() -> list[tuple[str, str]]:
    """(source, destination) of each `COPY` before the `pip install`, as the image's build runs."""
    before = DOCKERFILE.read_text().split("RUN pip install", 1)[0]
    pairs = []
    for line in re.findall(r"^COPY (.+)$", before, flags=re.MULTILINE):
        *sources, destination = line.split()
        pairs += [(source, destination) for source in sources]
    return pairs


def test_the_image_wheel_ships_the_package_and_its_runbooks(tmp_path: Path) -> None:
    context = tmp_path / "opt-kdgate"
    context.mkdir()
    for source, destination in copies_before_install():
        target = context / source if destination.endswith("/") else context / destination
        target.parent.mkdir(parents=True, exist_ok=True)
        path = ROOT / source
        if path.is_dir():
            # COPY keeps links as links (kdgate/service -> ../service).
            shutil.copytree(
                path, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(path, target)
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"kdgate/__init__.py", "kdgate/service/cli.py", "kdgate/service/runbooks.py"} <= names
    shipped = {f"kdgate/runbooks/{p.name}" for p in (ROOT / "docs" / "runbooks").glob("*.md")}
    assert shipped and shipped <= names, sorted(shipped - names)
