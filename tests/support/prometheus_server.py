"""A real Prometheus (Debian package) on 127.0.0.1, scraping given targets, for system tests.

Started with `--web.listen-address=127.0.0.1:0`; the port it got is read from its "Listening on"
log line. Config and TSDB live in a temp dir; the process is terminated (then killed) on exit.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from stack.process import PROMETHEUS, listening


@dataclass
class Prometheus:
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (raises on an error answer)."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if answer.get("status") != "success":
            raise RuntimeError(f"query failed: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_for(self, expr: str, target: float, deadline_seconds: float = 60.0) -> None:
        """Poll until `expr` gives one sample equal to `target`."""
        deadline = time.monotonic() + deadline_seconds
        while True:
            result = self.query(expr)
            if len(result) == 1 and float(result[0]["value"][1]) == target:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr} is {result}, expected {target}")
            time.sleep(0.2)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@contextmanager
def prometheus(tmp: Path, targets: Sequence[str], *, interval: str = "1s") -> Iterator[Prometheus]:
    """Run Prometheus scraping `targets` (host:port) every `interval` until exit."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("prometheus is not installed")
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": interval, "evaluation_interval": interval},
                "scrape_configs": [
                    {"job_name": "kdgate", "static_configs": [{"targets": list(targets)}]}
                ],
            }
        )
    )
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        "--web.listen-address=127.0.0.1:0",
    ]
    with listening(command, PROMETHEUS, deadline_seconds=30) as server:
        yield Prometheus(server.port, server.log)
