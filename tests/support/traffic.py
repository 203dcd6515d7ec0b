"""Configs with the admin API on, extra student versions, and admin request helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from kdgate.service.cards import load_card, model_path
from tests.support.tiny_model import write_config, write_tiny_student
from tests.support.v2 import json_request

TOKEN = "kdgate-test-admin-token-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = np.full((1, 64), 8.0, np.float32)


def write_admin_config(
    directory: Path, versions: dict[str, int] | None = None, *, token: str | None = TOKEN
) -> Path:
    """`write_config` (tiny students, seed = position) plus `admin: {token, state_dir}`."""
    path = write_config(directory, versions)
    config = yaml.safe_load(path.read_text())
    config["admin"] = {"token": token, "state_dir": str(directory / "state")}
    path.write_text(yaml.safe_dump(config))
    return path


def extra_student(directory: Path, version: str, seed: int) -> Path:
    """A tiny student outside the config (card version = `version`); returns its card path."""
    return write_tiny_student(directory / f"extra-{version}", version, seed=seed)


def tampered_student(directory: Path, version: str) -> Path:
    """A student whose ONNX file (same size) no longer matches the sha256 in its card."""
    card = extra_student(directory, version, seed=9)
    onnx_file = model_path(card, load_card(card))
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return card


def infer_body() -> dict[str, object]:
    """A one-row V2 JSON request for the digits signature."""
    return json_request(ROW)


def with_traffic_file(config: Path, traffic_file: Path, **options: object) -> Path:
    """Point `config` at `traffic_file` (`traffic: {file, **options}`); returns `config`."""
    data = yaml.safe_load(config.read_text())
    data["traffic"] = {"file": str(traffic_file), **options}
    config.write_text(yaml.safe_dump(data))
    return config


def write_traffic_file(
    path: Path, weights: dict[str, int], cards: dict[str, Path], **rest: object
) -> None:
    """A traffic file for model digits (written whole, as `kubectl apply` or an editor would)."""
    entry = {
        "versions": [{"version": v, "card": str(c)} for v, c in cards.items()],
        "weights": weights,
        **rest,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"models": {"digits": entry}}))
    tmp.replace(path)
