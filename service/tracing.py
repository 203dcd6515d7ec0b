"""OpenTelemetry tracing of inference and shadow comparison; off unless `OTEL_*` configures it.

    kdgate.infer           SERVER span per inference request (parent: the W3C `traceparent`)
    └── kdgate.student.run     the student's onnxruntime run
    kdgate.shadow.compare  one per shadow batch, a root span LINKED to the requests it compares;
                           a remote teacher call carries its `traceparent`

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`), and not `OTEL_SDK_DISABLED=true`. The SDK
then reads the other standard variables itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`; `OTEL_PROPAGATORS` for the
propagator). When off, this module is never imported, nothing is wrapped and a request pays
nothing. When on, `instrument` wraps `Inference.handle` and each student session's `run` on
their instances, so the hot-path code itself carries no tracing branches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TracerProvider

from kdgate.monitoring.shadow import ShadowSample, TraceHook
from kdgate.service.endpoints import package_version
from kdgate.service.inference import MODEL_VERSION, Inference, RawHeaders, Receive, Reply
from kdgate.service.state import ServingState

_EXPORTERS = ("otlp", "console")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """Whether the standard `OTEL_*` variables ask for traces (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return exporters.strip().lower() not in ("", "none")
    return any(environ.get(name) for name in _ENDPOINTS)


def provider_from_env(environ: Mapping[str, str]) -> TracerProvider:
    """An SDK tracer provider with a batch processor per exporter in `OTEL_TRACES_EXPORTER`
    (default `otlp`, over HTTP/protobuf). Needs the `otel` extra; raises ValueError on an
    exporter or OTLP protocol this build does not ship, so a typo does not silently drop traces.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    unknown = sorted(set(names) - set(_EXPORTERS))
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported {unknown}; kdgate ships {_EXPORTERS}")
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if "otlp" in names and protocol not in ("", "http/protobuf"):
        raise ValueError(f"OTLP protocol {protocol!r}: kdgate ships http/protobuf only")
    # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES, but attributes given here win over
    # it: name the service only where the operator did not.
    attributes = {"service.version": package_version()}
    if "OTEL_SERVICE_NAME" in environ or "service.name=" not in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = environ.get("OTEL_SERVICE_NAME") or "kdgate"
    provider = SdkTracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class _RawHeaderGetter(Getter[RawHeaders]):
    """Reads propagation fields from ASGI raw headers (lower-case bytes names)."""

    def get(self, carrier: RawHeaders, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    def keys(self, carrier: RawHeaders) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_GETTER = _RawHeaderGetter()


class Tracing:
    """Spans of one app on `provider`; `owned` providers are shut down (flushed) by `aclose`."""

    def __init__(self, provider: TracerProvider, *, owned: bool) -> None:
        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer("kdgate", package_version())

    def instrument(self, inference: Inference, state: ServingState) -> None:
        """Wrap `inference.handle` in a request span and every loaded student's `run` in a
        child span (instance attributes: both front doors look `handle` up per call)."""
        tracer = self.tracer
        handle = inference.handle

        async def traced_handle(
            protocol: str,
            model: str,
            version: str | None,
            raw_headers: Iterable[tuple[bytes, bytes]],
            receive: Receive,
        ) -> Reply:
            headers = list(raw_headers)
            with tracer.start_as_current_span(
                "kdgate.infer",
                context=propagate.extract(headers, getter=_GETTER),
                kind=SpanKind.SERVER,
                attributes={"kdgate.model": model, "kdgate.protocol": protocol},
            ) as span:
                reply = await handle(protocol, model, version, headers, receive)
                served = next((v for k, v in reply.headers if k == MODEL_VERSION), b"")
                span.set_attribute("kdgate.version", served.decode("latin-1"))
                span.set_attribute("http.response.status_code", reply.status)
                if reply.status >= 500:
                    span.set_status(StatusCode.ERROR)
                return reply

        # setattr: mypy rejects assigning to a method, which is exactly what is meant here.
        setattr(inference, "handle", traced_handle)  # noqa: B010
        inference.observe_in_request = True  # the shadow sample links to the request span
        for router in state.routers.values():
            for variant in router.variants.values():
                attributes = {"kdgate.model": variant.model, "kdgate.version": variant.version}
                run = _traced_run(tracer, variant.session.run, attributes)
                setattr(variant.session, "run", run)  # noqa: B010
                variant.batcher = None  # one span per request's run, inside its request span

    def request_context(self) -> SpanContext:
        """The current span's context (the request span, on the hot path), for linking."""
        return trace.get_current_span().get_span_context()

    def compare_span(self, model: str, teacher: str) -> TraceHook:
        """The shadow worker's `trace` hook: a span per compared batch, linked to its requests."""
        tracer = self.tracer

        def span(batch: Sequence[ShadowSample]) -> AbstractContextManager[Any]:
            links = [
                Link(s.trace)
                for s in batch
                if isinstance(s.trace, SpanContext) and s.trace.is_valid
            ]
            return tracer.start_as_current_span(
                "kdgate.shadow.compare",
                kind=SpanKind.INTERNAL,
                links=links,
                attributes={
                    "kdgate.model": model,
                    "kdgate.versions": sorted({s.version for s in batch}),
                    "kdgate.teacher": teacher,
                    "kdgate.shadow.rows": sum(s.rows for s in batch),
                    "kdgate.shadow.requests": len(batch),
                },
            )

        return span

    def inject_traceparent(self, request: httpx.Request) -> None:
        """httpx request hook: propagate the current span (the comparison) to a remote teacher
        (called on the teacher's thread, in the context copied from the shadow worker)."""
        propagate.inject(request.headers)

    async def aclose(self) -> None:
        """Flush and stop an owned provider (blocking export: done in a thread)."""
        shutdown = getattr(self.provider, "shutdown", None)
        if self.owned and shutdown is not None:
            await asyncio.to_thread(shutdown)


def _traced_run(tracer: trace.Tracer, run: Any, attributes: Mapping[str, str]) -> Any:
    def traced_run(inputs: Any) -> Any:
        with tracer.start_as_current_span("kdgate.student.run", attributes=attributes):
            return run(inputs)

    return traced_run
