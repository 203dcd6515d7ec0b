"""Two real `kdgate serve` processes sharing one traffic file: a change made through either
(the admin API of one, or an edit of the file) moves both to the new split within 5 s, as the
`x-kdgate-model-version` header of their answers shows."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import LiveServer, live_server
from tests.support.traffic import (
    AUTH,
    infer_body,
    with_traffic_file,
    write_admin_config,
    write_traffic_file,
)

pytestmark = pytest.mark.integration

CONVERGE_SECONDS = 5.0


def versions(server: LiveServer, n: int = 30) -> set[str]:
    """The versions that answered `n` split-routed requests."""
    seen = set()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(n):
            reply = client.post("/v2/models/digits/infer", json=infer_body())
            assert reply.status_code == 200, reply.text
            seen.add(reply.headers["x-kdgate-model-version"])
    return seen


def converge(servers: list[LiveServer], expected: set[str]) -> float:
    """Seconds until every server answers only with `expected`; fails past 5 s."""
    started = time.monotonic()
    pending = list(servers)
    while pending:
        pending = [s for s in pending if versions(s) != expected]
        elapsed = time.monotonic() - started
        assert elapsed < CONVERGE_SECONDS, f"{len(pending)} server(s) not on {expected}"
    return time.monotonic() - started


def test_two_servers_follow_one_traffic_file(tmp_path: Path) -> None:
    traffic_file = tmp_path / "shared" / "traffic.yaml"
    traffic_file.parent.mkdir()
    config = with_traffic_file(write_admin_config(tmp_path, {"1": 100, "2": 0}), traffic_file)
    cards = {v: tmp_path / "models" / f"student-v{v}.card.json" for v in ("1", "2")}
    with live_server(config) as one, live_server(config) as two:
        assert versions(one) == versions(two) == {"1"}

        put = httpx.put(
            f"{one.url}/admin/models/digits/traffic",
            json={"weights": {"1": 0, "2": 100}},
            headers=AUTH,
            timeout=30,
        )
        assert put.status_code == 200, put.text
        converge([one, two], {"2"})

        write_traffic_file(traffic_file, {"1": 100, "2": 0}, cards)  # as an operator would
        converge([one, two], {"1"})
        log = "".join(two.log)
        assert f"traffic: applied {traffic_file}" in log
