"""OpenTelemetry tracing of inference and shadow comparison: the `Tracer` when tracing is on.

    kdgate.infer           SERVER span per inference request (parent: the W3C `traceparent`)
    └── kdgate.student.run     the student's onnxruntime run
    kdgate.shadow.compare  one per shadow batch, a root span LINKED to the requests it compares;
                           a remote teacher call carries its `traceparent`

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`), and not `OTEL_SDK_DISABLED=true`
(`tracer.tracing_configured`), or when the app is given a provider. The SDK then reads the other
standard variables itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`; `OTEL_PROPAGATORS` for the
propagator). When off, this module is never imported (service/tracer.py: `NO_TRACER`).

`Tracing` is handed to what it traces when the app is built: the request path
(`TracedInference`), the one factory that builds every student version, loaded at start or
through the admin API (`VariantFactory`: each `run` in a child span, no micro-batcher, so one
`kdgate.student.run` span per request), and the shadow workers. The shadow sample carries the
request span's context in its `Served` row, so the comparison links to it without running
anything inside the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, StatusCode, TracerProvider

from kdgate.monitoring.shadow import ShadowSample, TraceHook
from kdgate.service.endpoints import package_version
from kdgate.service.tracer import RequestSpan, Run, tracing_configured

__all__ = ["Tracing", "provider_from_env", "tracing_configured"]

_EXPORTERS = ("otlp", "console")
RawHeaders = Sequence[tuple[bytes, bytes]]


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


class _RequestSpan:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def answered(self, status: int, version: str) -> None:
        self.span.set_attribute("kdgate.version", version)
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(StatusCode.ERROR)


class Tracing:
    """Spans of one app on `provider`; `owned` providers are shut down (flushed) by `aclose`."""

    enabled = True

    def __init__(self, provider: TracerProvider, *, owned: bool) -> None:
        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer("kdgate", package_version())

    @contextmanager
    def _request(self, model: str, protocol: str, headers: RawHeaders) -> Iterator[RequestSpan]:
        with self.tracer.start_as_current_span(
            "kdgate.infer",
            context=propagate.extract(headers, getter=_GETTER),
            kind=SpanKind.SERVER,
            attributes={"kdgate.model": model, "kdgate.protocol": protocol},
        ) as span:
            yield _RequestSpan(span)

    def request(
        self, model: str, protocol: str, headers: RawHeaders
    ) -> AbstractContextManager[RequestSpan]:
        """A `kdgate.infer` SERVER span, current while the request is handled."""
        return self._request(model, protocol, headers)

    def student_run(self, model: str, version: str, run: Run) -> Run:
        """`run` wrapped in a `kdgate.student.run` span (a child of the request span)."""
        tracer = self.tracer
        attributes = {"kdgate.model": model, "kdgate.version": version}

        def traced_run(inputs: Any) -> Any:
            with tracer.start_as_current_span("kdgate.student.run", attributes=attributes):
                return run(inputs)

        return traced_run

    def context(self) -> SpanContext:
        """The current span's context (the request span, on the hot path), for linking."""
        return trace.get_current_span().get_span_context()

    def compare(self, model: str, teacher: str) -> TraceHook:
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

    def http_hooks(self) -> Mapping[str, list[Callable[[httpx.Request], None]]]:
        """httpx hooks: propagate the current span (the comparison) to a remote teacher
        (called on the teacher's thread, in the context copied from the shadow worker)."""
        return {"request": [_inject_traceparent]}

    async def aclose(self) -> None:
        """Flush and stop an owned provider (blocking export: done in a thread)."""
        shutdown = getattr(self.provider, "shutdown", None)
        if self.owned and shutdown is not None:
            await asyncio.to_thread(shutdown)


def _inject_traceparent(request: httpx.Request) -> None:
    propagate.inject(request.headers)
