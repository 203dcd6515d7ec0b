"""A kdgate config for SLO/webhook tests (the default digits pair, test-sized windows) and
background traffic from `service.loadgen`.

    config = write_slo_config(tmp_path, webhook_url=receiver.url, secret=SECRET)
    with live_server(config) as gateway, traffic(gateway.url, "invert"):
        ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kdgate.service.loadgen import Drift, LoadConfig, LoadStats, run_load
from kdgate.service.settings import default_models_dir

TOKEN = "test-admin-token-0123456789"  # a test credential


def write_slo_config(
    directory: Path,
    *,
    webhook_url: str | None,
    secret: str | None,
    cooldown_seconds: float = 600,
    group_wait_seconds: float = 15,
    shadow_fraction: float = 1.0,
) -> Path:
    """The default pair with every sample shadowed and windows of 20 s (k = 2, every 1 s);
    breaches of one model within `group_wait_seconds` are one retrain request."""
    digits = default_models_dir() / "digits"
    config: dict[str, Any] = {
        "models": [
            {
                "name": "digits",
                "students": [{"version": "1", "card": str(digits / "student-v1.card.json")}],
                "teacher": {"card": str(digits / "teacher.card.json")},
                "traffic": {"shadow_fraction": shadow_fraction},
            }
        ],
        "slo": {
            "window_seconds": 20,
            "window_buckets": 10,
            "min_samples": 50,
            "evaluate_every_seconds": 1,
            "consecutive_breaches": 2,
        },
        "drift": {"every_seconds": 2, "window_rows": 300, "min_rows": 100},
        "webhook": {
            "url": webhook_url,
            "secret": secret,
            "outbox_path": str(directory / "outbox.sqlite3"),
            "cooldown_seconds": cooldown_seconds,
            "group_wait_seconds": group_wait_seconds,
            "backoff_base_seconds": 0.5,
            "backoff_cap_seconds": 2,
            "poll_seconds": 0.5,
        },
        "admin": {"token": TOKEN, "state_dir": str(directory / "state")},
    }
    path = directory / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def traffic(
    url: str, drift: Drift = "none", *, rate: float = 40, seed: int = 0
) -> Iterator[dict[str, LoadStats]]:
    """`rate` requests/s from `run_load` in a background thread until the block ends."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    result: dict[str, LoadStats] = {}
    config = LoadConfig(url=url, rate=rate, duration_seconds=3600, drift=drift, seed=seed)

    def run() -> None:
        result["stats"] = loop.run_until_complete(run_load(config, stop=stop))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()
