"""The machine and tool versions a benchmark ran on, for the results JSON and the docs."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import k6, wrk


def cpu_model(cpuinfo: str) -> str:
    """The first `model name` in /proc/cpuinfo text ("unknown" when there is none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unavailable"


def describe() -> dict[str, Any]:
    """nproc, CPU model, kernel, load average and the versions of everything measured."""
    packages = ("onnxruntime", "uvicorn", "fastapi", "pydantic", "orjson", "httptools", "uvloop")
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    wrk_path, k6_path = wrk.find(), k6.find()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(Path("/proc/cpuinfo").read_text()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "packages": versions,
        "wrk": _first_line([wrk_path, "-v"]) if wrk_path else "missing",
        "k6": _first_line([k6_path, "version"]) if k6_path else "missing",
    }
