"""The ASGI application: `create_app(settings)` builds it, its lifespan loads the models.

    KdgateApp.__call__
    ├── a route on the wrong port (server.admin_port set) -> 404 (service/listeners.py)
    ├── POST /v2/models/{m}[/versions/{v}]/infer, POST /v1/models/{m}:predict
    │     raw ASGI fast path -> Guard.serve (service/overload.py) -> Inference.handle
    │     -> two ASGI send()s
    └── everything else -> FastAPI (routing, OpenAPI, error handlers)

Why a fast path: on this machine a bare ASGI + orjson + onnxruntime handler costs ~91 us CPU per
request, Starlette routing ~124 us and FastAPI + pydantic ~252 us. Matching two URL shapes with
string operations in front of the router keeps inference near the bare-ASGI ceiling, while the
same endpoints stay registered on FastAPI (same handler code) so the OpenAPI schema is complete.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.process_metrics import register_process_metrics
from kdgate.monitoring.recent import RecentWindow
from kdgate.service import schemas
from kdgate.service.admin import build_admin_router
from kdgate.service.endpoints import JsonResponse, build_router
from kdgate.service.errors import KdgateError
from kdgate.service.fastpath import match_infer
from kdgate.service.fidelity_api import build_fidelity_router
from kdgate.service.inference import (
    MODEL_VERSION,
    NO_VERSION,
    REQUEST_ID,
    ClientDisconnected,
    Inference,
    TracedInference,
    new_request_id,
)
from kdgate.service.leader import ALWAYS_LEADER
from kdgate.service.listeners import PortSplit
from kdgate.service.logs import SCOPE_REQUEST_ID, bind_request, unbind_request
from kdgate.service.monitoring_runtime import MonitoringRuntime
from kdgate.service.overload import Guard
from kdgate.service.protocol_v2 import valid_request_id
from kdgate.service.request_log import RequestLog
from kdgate.service.request_metrics import RequestMetrics
from kdgate.service.rollout_metrics import RolloutExport
from kdgate.service.rollouts import Rollouts
from kdgate.service.settings import Settings
from kdgate.service.siblings import Siblings
from kdgate.service.slo_api import build_slo_router
from kdgate.service.state import ServingState, StudentLoader, VariantFactory, load_student
from kdgate.service.tracer import tracer_from
from kdgate.service.traffic import TrafficControl, TrafficMetrics
from kdgate.service.traffic_store import TrafficStore

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


class KdgateApp(FastAPI):
    """FastAPI with the inference fast path in front of its middleware and router."""

    def __init__(
        self, state: ServingState, inference: Inference, *, fast_path: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.serving = state
        self.inference = inference
        self.fast_path = fast_path
        server = state.settings.server
        self.guard = Guard(
            self.inference,
            state,
            max_in_flight=server.max_in_flight,
            timeout_seconds=server.request_timeout_seconds,
        )
        # Set when admin routes have their own port (service/listeners.py).
        self.ports = None if server.admin_port is None else PortSplit(server.admin_port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self.ports is not None and (misplaced := self.ports.misplaced(scope)):
            await self.ports.refuse(misplaced, send)
            return
        request = bind_request(scope)  # log lines name the request (service/logs.py)
        try:
            target = match_infer(scope["path"]) if scope["method"] == "POST" else None
            if target is not None and self.fast_path:
                try:
                    reply = await self.guard.serve(*target, scope["headers"], receive)
                except ClientDisconnected:
                    return
                await send(
                    {
                        "type": "http.response.start",
                        "status": reply.status,
                        "headers": reply.headers,
                    }
                )
                await send({"type": "http.response.body", "body": reply.body})
                reply.after()
                return
            await super().__call__(scope, receive, _with_identity_headers(scope, send))
        finally:
            unbind_request(request)

    def openapi(self) -> dict[str, Any]:
        """The generated schema plus the infer request bodies (parsed by codecs, not pydantic)."""
        if self.openapi_schema is None:
            schema = super().openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas.DOCUMENTED_BODIES:
                components.update(_component_schemas(model))
        return super().openapi()


def _component_schemas(model: type[BaseModel]) -> dict[str, Any]:
    found = model.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions: dict[str, Any] = found.pop("$defs", {})
    return {**definitions, model.__name__: found}


def _with_identity_headers(scope: Scope, send: Send) -> Send:
    """Add `x-request-id` and `x-kdgate-model-version` to responses that did not set them."""
    request_id = next((v for k, v in scope["headers"] if k == REQUEST_ID), b"")
    if not valid_request_id(request_id.decode("latin-1")):
        request_id = new_request_id().encode()
        scope[SCOPE_REQUEST_ID] = request_id.decode()  # for log lines (service/logs.py)

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {name.lower() for name, _ in headers}
            if MODEL_VERSION not in present:
                headers.append((MODEL_VERSION, NO_VERSION))
            if REQUEST_ID not in present:
                headers.append((REQUEST_ID, request_id))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_headers


async def _kdgate_error(_: Request, exc: Exception) -> JsonResponse:
    assert isinstance(exc, KdgateError)
    response = JsonResponse({"error": exc.message}, status_code=exc.status_code)
    response.raw_headers.extend(exc.headers)
    return response


async def _http_error(_: Request, exc: Exception) -> JsonResponse:
    assert isinstance(exc, HTTPException)
    return JsonResponse({"error": str(exc.detail)}, status_code=exc.status_code)


async def _validation_error(_: Request, exc: Exception) -> JsonResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JsonResponse({"error": f"invalid request: {problems}"}, status_code=400)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    student_loader: StudentLoader = load_student,
    fast_path: bool = True,
    tracer_provider: TracerProvider | None = None,
    siblings: Siblings | None = None,
) -> KdgateApp:
    """Build the kdgate ASGI app; models load (sha256 verified) and warm up in its lifespan.

    `registry` receives every metric (a fresh one when None); `student_loader` turns a student's
    settings into a session (tests inject slow or failing ones); `fast_path=False` serves the
    infer endpoints through the FastAPI routes instead (same handler; for tests and benchmarks);
    `tracer_provider` turns tracing on with that provider (else only `OTEL_*` variables do);
    `siblings`: the host's other workers under `kdgate serve --workers N` (service/workers.py):
    `/metrics` merges theirs, feedback reaches theirs, only the host's leader runs drift and
    the webhook sender.

    Built here, each given its collaborators: the request log with its consumers (request
    metrics, the monitoring runtime), the one recent window they and the SLO monitor share, the
    tracer (a no-op unless configured) and the one factory every student version is built by.
    """
    # The traffic file wins over the config's traffic for the models it names (logged at start).
    store = TrafficStore(settings.traffic_file, read_only=settings.traffic.read_only)
    restored = store.restore(settings)
    config, settings = settings.models, restored.settings
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    register_process_metrics(registry)
    state = ServingState(settings, metrics)
    tracer = tracer_from(tracer_provider, os.environ)
    # One window feeds GET /v1/fidelity, GET /v1/slo and the SLO monitor (monitoring/recent.py).
    slo = settings.slo
    window = RecentWindow(
        window_seconds=slo.window_seconds, bucket_seconds=slo.window_seconds / slo.window_buckets
    )
    request_metrics = RequestMetrics(state.versions, window=window)
    runtime = MonitoringRuntime(
        settings,
        state,
        metrics,
        window=window,
        tracer=tracer,
        leader=ALWAYS_LEADER if siblings is None else siblings.leader,
    )
    log = RequestLog(consumers=[request_metrics, runtime])
    # A collect of the request families first settles the requests answered so far.
    registry.register(request_metrics.export(before=log.settle))
    build = VariantFactory(
        settings.server,
        loader=student_loader,
        tracer=tracer,
        request_metrics=request_metrics,
        metrics=metrics,
    )
    traffic = TrafficControl(state, build, store, restored, config, TrafficMetrics(registry))
    rollouts = Rollouts(settings.models, traffic, runtime)
    registry.register(RolloutExport(rollouts))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Reading files and building sessions blocks for a while: keep the loop free.
        await asyncio.to_thread(state.load, build)
        await traffic.start()
        await runtime.start()
        await rollouts.start()
        try:
            yield
        finally:
            state.ready = False
            await rollouts.stop()
            await traffic.stop()
            log.settle()  # the last requests' bookkeeping, while its consumers still run
            await runtime.stop()
            await tracer.aclose()

    inference = (TracedInference if tracer.enabled else Inference)(state, log, tracer)
    app = KdgateApp(
        state,
        inference,
        fast_path=fast_path,
        title="kdgate",
        summary="Open Inference Protocol V2 and KServe V1 serving for distilled students",
        lifespan=lifespan,
        redirect_slashes=False,  # `.../infer/` is 404, as on Triton; not a 307 to `.../infer`
    )
    # X-Forwarded-For/-Proto from trusted proxies (uvicorn's rule and FORWARDED_ALLOW_IPS) for
    # the framework routes, whose admin audit lines name the client; `kdgate serve` turns
    # uvicorn's own copy off, which ran it on every inference request too (~2 % of their CPU).
    app.add_middleware(
        ProxyHeadersMiddleware,
        trusted_hosts=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
    )
    app.add_exception_handler(KdgateError, _kdgate_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(build_router(state, app.inference, siblings=siblings))
    app.include_router(build_fidelity_router(state, runtime, log, siblings))
    app.include_router(build_slo_router(settings, runtime, log, siblings))
    app.state.monitoring = runtime
    app.state.request_log = log
    app.include_router(build_admin_router(settings, traffic, rollouts))
    return app
