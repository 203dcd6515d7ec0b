"""What `kdgate serve` writes to its log: timestamps and levels, JSON on request, request ids,
an access log when asked, and never a secret."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.live_server import LiveServer, live_server
from tests.support.tiny_model import write_config

pytestmark = pytest.mark.integration

TOKEN = "admin-token-4b1d7e93aa"
WEBHOOK_SECRET = "whsec_bG9nLXRlc3Qtc2VjcmV0LWJ5dGVzLTAxMjM0NQ=="
BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def config_with_secrets(directory: Path, **server: object) -> Path:
    config = write_config(directory, **server)
    data = yaml.safe_load(config.read_text())
    data["admin"] = {"token": TOKEN, "state_dir": str(directory / "state")}
    data["webhook"] = {
        "url": "http://127.0.0.1:9/hook",
        "secret": WEBHOOK_SECRET,
        "outbox_path": str(directory / "outbox.sqlite3"),
    }
    config.write_text(yaml.safe_dump(data))
    return config


def wait_for(server: LiveServer, text: str, deadline_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while text not in server.output():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.output()}"
        time.sleep(0.05)


def json_entries(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_json_logs_name_the_request_and_hold_no_secret(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path, log_format="json", access_log=True)
    with live_server(config) as server:
        infer = httpx.post(
            f"{server.url}/v2/models/digits/infer", json=BODY, headers={"x-request-id": "req-1"}
        )
        assert infer.status_code == 200
        live = httpx.get(f"{server.url}/v2/health/live")  # no id given: kdgate makes one up
        made_up = live.headers["x-request-id"]
        change = httpx.put(
            f"{server.url}/admin/models/digits/traffic",
            json={"weights": {"1": 100}, "shadow_fraction": 0.5},
            headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "admin-7"},
        )
        assert change.status_code == 200, change.text
        wait_for(server, made_up)
        output = server.output()
    entries = json_entries(output)  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert RFC3339_UTC.match(entry["time"]), entry
    access = {e["request_id"]: e for e in entries if e["logger"] == "kdgate.access"}
    assert access["req-1"]["message"].startswith("POST /v2/models/digits/infer 200 ")
    assert access[made_up]["message"].startswith("GET /v2/health/live 200 ")
    assert re.search(r" \d+\.\d{3}ms$", access["req-1"]["message"])
    audit = [e for e in entries if e["logger"] == "kdgate.audit"]
    assert audit and audit[0]["request_id"] == "admin-7", audit
    assert any("Uvicorn running on" in e["message"] for e in entries)
    assert TOKEN not in output and WEBHOOK_SECRET not in output


def test_text_logs_have_time_and_level_and_no_access_log_by_default(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path)
    with live_server(config) as server:
        assert httpx.post(f"{server.url}/v2/models/digits/infer", json=BODY).status_code == 200
        output = server.output()
    started = next(line for line in output.splitlines() if "Uvicorn running on" in line)
    time_text, level, logger, _ = started.split(" ", 3)
    assert RFC3339_UTC.match(time_text) and level == "INFO" and logger.endswith(":")
    assert "/v2/models/digits/infer" not in output  # access_log is off
    assert TOKEN not in output and WEBHOOK_SECRET not in output
