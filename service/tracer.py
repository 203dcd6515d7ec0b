"""Tracing as an explicit dependency: the `Tracer` interface, a no-op default, and the choice.

    tracer = tracer_from(provider, os.environ)   # NO_TRACER unless tracing is configured
    create_app(settings, tracer_provider=...)    # passes it to the request path, the variant
                                                 # factory and the monitoring runtime

With tracing off nothing imports opentelemetry and the request path runs the untraced code (the
app builds a plain `Inference`, the factory leaves each student's `run` as it is). With tracing on,
service/tracing.py (`Tracing`) gives the spans; the span names and attributes are listed there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import httpx
    from opentelemetry.trace import TracerProvider

    from kdgate.monitoring.shadow import TraceHook

Run = Callable[[Any], Any]

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """Whether the standard `OTEL_*` variables ask for traces: `OTEL_TRACES_EXPORTER` names an
    exporter, or an OTLP endpoint is set; and not `OTEL_SDK_DISABLED=true`."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return exporters.strip().lower() not in ("", "none")
    return any(environ.get(name) for name in _ENDPOINTS)


class RequestSpan(Protocol):
    """The span of one inference request, told how it ended."""

    def answered(self, status: int, version: str) -> None: ...


class Tracer(Protocol):
    """What kdgate traces; `enabled` False means every method is a no-op."""

    enabled: bool

    def request(
        self, model: str, protocol: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> AbstractContextManager[RequestSpan]:
        """The span of one inference request (parent: the caller's `traceparent`)."""
        ...

    def student_run(self, model: str, version: str, run: Run) -> Run:
        """`run` of a student session, each call in a child span of the request."""
        ...

    def context(self) -> Any:
        """The current span's context (the request's, on the request path), for linking."""
        ...

    def compare(self, model: str, teacher: str) -> TraceHook | None:
        """The shadow worker's span per compared batch, linked to its requests."""
        ...

    def http_hooks(self) -> Mapping[str, list[Callable[[httpx.Request], None]]]:
        """httpx event hooks that carry the current span to a remote teacher."""
        ...

    async def aclose(self) -> None:
        """Flush and stop what this tracer owns."""
        ...


class _Unanswered:
    def answered(self, status: int, version: str) -> None:
        return None


class NoTracer:
    """The default: traces nothing, costs nothing."""

    enabled = False

    def request(
        self, model: str, protocol: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> AbstractContextManager[RequestSpan]:
        return nullcontext(_Unanswered())

    def student_run(self, model: str, version: str, run: Run) -> Run:
        return run

    def context(self) -> Any:
        return None

    def compare(self, model: str, teacher: str) -> TraceHook | None:
        return None

    def http_hooks(self) -> Mapping[str, list[Callable[[httpx.Request], None]]]:
        return {}

    async def aclose(self) -> None:
        return None


NO_TRACER: Tracer = NoTracer()


def tracer_from(provider: TracerProvider | None, environ: Mapping[str, str]) -> Tracer:
    """OpenTelemetry tracing on `provider` (not owned), or on a provider built from the `OTEL_*`
    variables of `environ` when they configure tracing (owned: flushed by `aclose`); else
    `NO_TRACER`, without importing opentelemetry."""
    if provider is None and not tracing_configured(environ):
        return NO_TRACER
    from kdgate.service.tracing import Tracing, provider_from_env

    if provider is not None:
        return Tracing(provider, owned=False)
    return Tracing(provider_from_env(environ), owned=True)
