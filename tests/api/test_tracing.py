"""OpenTelemetry: the request span, its student-run child and the linked shadow comparison span,
seen by the SDK's in-memory exporter; W3C traceparent in; tracing off leaves the path untouched."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.inference import Inference
from kdgate.service.settings import Settings, load_settings
from kdgate.service.tracing import provider_from_env, tracing_configured
from tests.support.asgi import running
from tests.support.fidelity_reference import DIGITS
from tests.support.traffic import AUTH, extra_student, infer_body, write_admin_config

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def settings() -> Settings:
    return Settings.model_validate(
        {
            "server": {"warmup_runs": 1},
            "models": [
                {
                    "name": "digits",
                    "students": [{"version": "1", "card": DIGITS / "student-v1.card.json"}],
                    "teacher": {"card": DIGITS / "teacher.card.json"},
                    "traffic": {"shadow_fraction": 1.0},
                }
            ],
        }
    )


async def test_request_span_student_child_and_linked_shadow_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings(), registry=CollectorRegistry(), tracer_provider=provider)
    body = {
        "id": "traced-1",
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [1.0] * 128}],
    }
    async with running(app) as client:
        r = await client.post(
            "/v2/models/digits/infer",
            json=body,
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        assert r.status_code == 200
        for _ in range(500):
            if any(s.name == "kdgate.shadow.compare" for s in exporter.get_finished_spans()):
                break
            await asyncio.sleep(0.01)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request, run, compare = (
        spans["kdgate.infer"],
        spans["kdgate.student.run"],
        spans["kdgate.shadow.compare"],
    )
    # The request continues the caller's trace (W3C traceparent).
    assert request.kind == SpanKind.SERVER
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert request.parent is not None and f"{request.parent.span_id:016x}" == PARENT_ID
    assert request.attributes is not None
    assert request.attributes["kdgate.model"] == "digits"
    assert request.attributes["kdgate.version"] == "1"
    assert request.attributes["http.response.status_code"] == 200
    # The student run is its child.
    assert run.parent is not None and run.parent.span_id == request.context.span_id
    assert run.attributes == {"kdgate.model": "digits", "kdgate.version": "1"}
    # The comparison is its own trace, linked to the request it compared.
    assert compare.parent is None
    assert [link.context.span_id for link in compare.links] == [request.context.span_id]
    assert compare.attributes is not None
    assert compare.attributes["kdgate.model"] == "digits"
    assert tuple(compare.attributes["kdgate.versions"]) == ("1",)
    assert compare.attributes["kdgate.shadow.rows"] == 2


async def test_a_version_loaded_through_the_admin_api_is_traced_like_one_loaded_at_start(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = load_settings(write_admin_config(tmp_path, {"1": 100}))
    assert settings.server.batch_max_rows > 1  # untraced, versions would share batched runs
    app = create_app(settings, registry=CollectorRegistry(), tracer_provider=provider)
    async with running(app) as client:
        card = extra_student(tmp_path, "3", seed=3)
        loaded = await client.post(
            "/admin/models/digits/versions", headers=AUTH, json={"card": str(card)}
        )
        assert loaded.status_code == 201, loaded.text
        exporter.clear()
        for version in ("1", "3"):
            for _ in range(3):
                url = f"/v2/models/digits/versions/{version}/infer"
                assert (await client.post(url, json=infer_body())).status_code == 200
        variants = app.serving.routers["digits"].variants
        assert variants["1"].batcher is None and variants["3"].batcher is None
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "kdgate.infer"]
    runs = [s for s in spans if s.name == "kdgate.student.run"]
    assert len(requests) == len(runs) == 6  # one student run span per request, both versions
    by_request = {s.context.span_id: s for s in requests}
    for run in runs:
        assert run.parent is not None
        request = by_request[run.parent.span_id]
        assert request.attributes is not None and run.attributes is not None
        assert run.attributes == {
            "kdgate.model": "digits",
            "kdgate.version": request.attributes["kdgate.version"],
        }
    assert sorted(str(s.attributes["kdgate.version"]) for s in runs if s.attributes) == [
        "1", "1", "1", "3", "3", "3"
    ]  # fmt: skip


async def test_tracing_off_wraps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    app = create_app(settings(), registry=CollectorRegistry())
    async with running(app):
        assert type(app.inference) is Inference
        assert "handle" not in vars(app.inference)
        variant = app.serving.routers["digits"].default
        assert variant.run == variant.session.run  # the session's own method, unwrapped
        assert "run" not in vars(variant.session)


def test_tracing_off_never_imports_the_tracing_module_or_the_sdk() -> None:
    # FastAPI itself may import the opentelemetry API; kdgate adds neither its tracing module
    # (which imports the API and exporters) nor the SDK.
    code = (
        "import sys, asyncio\n"
        "from prometheus_client import CollectorRegistry\n"
        "from kdgate.service.app import create_app\n"
        "from kdgate.service.settings import Settings\n"
        "from tests.support.asgi import running\n"
        "async def main():\n"
        "    async with running(create_app(Settings(), registry=CollectorRegistry())) as c:\n"
        "        assert (await c.get('/v2/health/ready')).status_code == 200\n"
        "asyncio.run(main())\n"
        "names = ('opentelemetry.sdk', 'kdgate.service.tracing')\n"
        "print(sorted(m for m in sys.modules if m.startswith(names)))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_on_only_when_otel_variables_configure_it(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing_configured(environ) is on


def test_unsupported_exporters_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        provider_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/protobuf"):
        provider_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw"})
    try:
        assert provider.resource.attributes["service.name"] == "gw"  # type: ignore[attr-defined]
    finally:
        provider.shutdown()  # type: ignore[attr-defined]
