"""`server.admin_port`: admin, metrics and hooks on their own port, inference and health on the
main one, both served by one `kdgate serve` process."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.live_server import LiveServer, live_server
from tests.support.tiny_model import write_config

pytestmark = pytest.mark.integration

TOKEN = "admin-token-90c2f1d3b4"
ADMIN_LISTENING = re.compile(r"admin, metrics and hooks on http://127\.0\.0\.1:(\d+)")
BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
AUTH = {"authorization": f"Bearer {TOKEN}"}


def admin_url(server: LiveServer, deadline_seconds: float = 10.0) -> str:
    deadline = time.monotonic() + deadline_seconds
    while (match := ADMIN_LISTENING.search(server.output())) is None:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    return f"http://127.0.0.1:{match.group(1)}"


def test_admin_routes_live_on_their_own_port(tmp_path: Path) -> None:
    config = write_config(tmp_path, admin_port=0)
    data = yaml.safe_load(config.read_text())
    data["admin"] = {"token": TOKEN, "state_dir": str(tmp_path / "state")}
    config.write_text(yaml.safe_dump(data))
    with live_server(config) as server:
        main, admin = server.url, admin_url(server)
        assert main != admin
        # The main port: inference and health, nothing of the operator's.
        assert httpx.post(f"{main}/v2/models/digits/infer", json=BODY).status_code == 200
        assert httpx.get(f"{main}/v2/health/ready").status_code == 200
        for method, path in [
            ("GET", "/metrics"),
            ("GET", "/admin/models/digits/traffic"),
            ("POST", "/v1/hooks/alertmanager"),
        ]:
            answer = httpx.request(method, main + path, headers=AUTH, json={})
            assert answer.status_code == 404, (path, answer.text)
            assert "admin port" in answer.json()["error"]
        # The admin port: metrics, admin and hooks, no inference.
        metrics = httpx.get(f"{admin}/metrics")
        assert metrics.status_code == 200
        served = [line for line in metrics.text.splitlines() if 'code="200"' in line]
        assert any(line.startswith("kdgate_requests_total{") for line in served)
        traffic = httpx.get(f"{admin}/admin/models/digits/traffic", headers=AUTH)
        assert traffic.status_code == 200 and traffic.json()["weights"] == {"1": 100}
        hook = httpx.post(f"{admin}/v1/hooks/alertmanager", json={})
        assert hook.status_code == 401  # served here: it asks for the token
        assert httpx.post(f"{admin}/v2/models/digits/infer", json=BODY).status_code == 404
        assert httpx.get(f"{admin}/v2/health/ready").status_code == 404
    assert "Finished server process" in server.output()  # SIGTERM stopped both listeners
