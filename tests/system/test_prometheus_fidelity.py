"""A real Prometheus scrapes a real kdgate gateway shadowing the digits test split to the
teacher; the ECE expression of docs/metrics.md (the DESIGN.md formula), evaluated by Prometheus,
equals the ECE kdgate computes in process (GET /v1/fidelity)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml

from kdgate.distill.data import load_split
from tests.support.fidelity_reference import DIGITS
from tests.support.live_server import live_server
from tests.support.prometheus_server import prometheus, prometheus_binary

pytestmark = pytest.mark.system

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_ece_expression() -> str:
    """The PromQL block that follows the **ECE** paragraph of docs/metrics.md."""
    text = METRICS_DOC.read_text()
    match = re.search(r"\*\*ECE\*\*.*?```promql\n(.*?)```", text, re.S)
    assert match, "docs/metrics.md has no ECE PromQL block"
    return match.group(1)


def test_promql_ece_equals_in_process_ece(tmp_path: Path) -> None:
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0, "warmup_runs": 2},
                "models": [
                    {
                        "name": "digits",
                        "students": [
                            {"version": "1", "card": str(DIGITS / "student-v1.card.json")}
                        ],
                        "teacher": {"card": str(DIGITS / "teacher.card.json")},
                        "traffic": {"shadow_fraction": 1.0},
                    }
                ],
            }
        )
    )
    inputs = load_split().test.inputs
    expr = documented_ece_expression()
    with (
        live_server(config) as gateway,
        prometheus(tmp_path, [f"127.0.0.1:{gateway.port}"], interval="1s") as prom,
    ):
        # The zero baseline of every calibration series is scraped before any traffic.
        prom.wait_for('count(kdgate_calibration_samples_total{reference="teacher"})', 15)
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            for i, row in enumerate(inputs):
                body = {
                    "id": f"p{i}",
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 64],
                            "datatype": "FP32",
                            "data": row.tolist(),
                        }
                    ],
                }
                assert client.post("/v2/models/digits/infer", json=body).status_code == 200
        prom.wait_for("sum(kdgate_fidelity_samples_total)", len(inputs))
        in_process = httpx.get(f"{gateway.url}/v1/fidelity", timeout=5).json()
        result = prom.query(expr)

    assert in_process["models"]["digits"]["samples"] == len(inputs)
    expected = in_process["models"]["digits"]["versions"]["1"]["ece_teacher"]
    assert len(result) == 1
    assert result[0]["metric"] == {"model": "digits", "version": "1"}
    assert float(result[0]["value"][1]) == pytest.approx(expected, rel=1e-9)
    assert expected > 0
