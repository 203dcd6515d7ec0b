"""FastAPI routes: health, metadata, /metrics, the runbooks, and the documented infer endpoints.

The infer routes call the same `Inference.handle` the raw ASGI fast path calls (service/app.py
puts the fast path in front, so in production these routes document the endpoints and serve
only when the fast path is switched off). Every answer here is small and off the hot path.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from kdgate.service import schemas
from kdgate.service.errors import NotReady
from kdgate.service.inference import MODEL_VERSION, Inference, Reply
from kdgate.service.routing import Router
from kdgate.service.runbooks import MEDIA_TYPE as MARKDOWN
from kdgate.service.runbooks import Runbooks
from kdgate.service.siblings import Siblings
from kdgate.service.state import ServingState

SERVER_NAME = "kdgate"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in (
        (400, "bad input: what was wrong and what was expected"),
        (404, "unknown model or version"),
        (413, "body over server.max_body_bytes"),
        (503, "model not ready"),
    )
}
_V2_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: JSON header of "
                "Inference-Header-Content-Length bytes, then the raw input tensors",
            },
        },
    }
}
_V1_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/V1PredictRequest"}}
        },
    }
}


class JsonResponse(Response):
    """A JSON response serialised with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def package_version() -> str:
    """The installed kdgate version ("0.0.0" when running from an uninstalled tree)."""
    try:
        return importlib.metadata.version("kdgate")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class ReplyResponse(Response):
    """A Response carrying a pre-built `Reply` (its headers already include content-length)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(content=reply.body, status_code=reply.status)
        self.raw_headers = reply.headers
        self.reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)
        self.reply.after()  # the request's bookkeeping, once the response is sent


def _versioned(body: Any, version: str, status: int = 200) -> JsonResponse:
    return JsonResponse(body, status_code=status, headers={MODEL_VERSION.decode(): version})


def _router_for(state: ServingState, model: str, version: str | None) -> Router:
    state.check_version(model, version)
    return state.router(model)


def build_router(
    state: ServingState,
    inference: Inference,
    runbooks: Runbooks | None = None,
    siblings: Siblings | None = None,
) -> APIRouter:
    """All routes of the app, bound to one serving state; `runbooks` defaults to the shipped
    ones (read here, once per app); with `siblings` (`--workers`), `/metrics` is the host's."""
    api = APIRouter(responses=_ERRORS)
    server_version = package_version()
    books = Runbooks.load() if runbooks is None else runbooks

    @api.get("/", response_model=schemas.V1Live, tags=["v1"], summary="V1 liveness")
    async def root() -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/v2", response_model=schemas.ServerMetadata, tags=["v2"])
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version, "extensions": EXTENSIONS}

    @api.get("/v2/health/live", response_model=schemas.ServerLive, tags=["v2"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", response_model=schemas.ServerReady, tags=["v2"])
    async def ready() -> JsonResponse:
        return JsonResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    def metadata(model: str, version: str | None) -> JsonResponse:
        router = _router_for(state, model, version)
        variant = router.get(version) if version else router.default
        card = variant.session.card
        body = {
            "name": model,
            "versions": list(router.variants),
            "platform": PLATFORM,
            "inputs": [t.model_dump() for t in card.inputs],
            "outputs": [t.model_dump() for t in card.outputs],
        }
        return _versioned(body, variant.version)

    def readiness(model: str, version: str | None) -> JsonResponse:
        state.check_version(model, version)
        router = state.routers.get(model)
        shown = version or (router.default.version if router else "none")
        return _versioned(
            {"name": model, "ready": router is not None}, shown, 200 if router else 503
        )

    @api.get("/v2/models/{model}", response_model=schemas.ModelMetadata, tags=["v2"])
    async def model_metadata(model: str) -> JsonResponse:
        return metadata(model, None)

    @api.get(
        "/v2/models/{model}/versions/{version}",
        response_model=schemas.ModelMetadata,
        tags=["v2"],
    )
    async def model_version_metadata(model: str, version: str) -> JsonResponse:
        return metadata(model, version)

    @api.get("/v2/models/{model}/ready", response_model=schemas.ModelReady, tags=["v2"])
    async def model_ready(model: str) -> JsonResponse:
        return readiness(model, None)

    @api.get(
        "/v2/models/{model}/versions/{version}/ready",
        response_model=schemas.ModelReady,
        tags=["v2"],
    )
    async def model_version_ready(model: str, version: str) -> JsonResponse:
        return readiness(model, version)

    @api.post(
        "/v2/models/{model}/infer",
        response_model=schemas.InferenceResponse,
        tags=["v2"],
        openapi_extra=_V2_BODY,
    )
    async def infer(model: str, request: Request) -> ReplyResponse:
        return ReplyResponse(
            await inference.handle("v2", model, None, request.scope["headers"], request.receive)
        )

    @api.post(
        "/v2/models/{model}/versions/{version}/infer",
        response_model=schemas.InferenceResponse,
        tags=["v2"],
        openapi_extra=_V2_BODY,
    )
    async def infer_version(model: str, version: str, request: Request) -> ReplyResponse:
        return ReplyResponse(
            await inference.handle("v2", model, version, request.scope["headers"], request.receive)
        )

    @api.get("/v1/models", response_model=schemas.V1ModelList, tags=["v1"])
    async def v1_models() -> dict[str, list[str]]:
        return {"models": list(state.versions)}

    @api.get("/v1/models/{model}", response_model=schemas.V1ModelStatus, tags=["v1"])
    async def v1_model(model: str) -> JsonResponse:
        try:
            router = state.router(model)
        except NotReady:
            return _versioned({"name": model, "ready": False}, "none", 503)
        return _versioned({"name": model, "ready": True}, router.default.version)

    @api.post(
        "/v1/models/{model}:predict",
        response_model=schemas.V1PredictResponse,
        tags=["v1"],
        openapi_extra=_V1_BODY,
    )
    async def v1_predict(model: str, request: Request) -> ReplyResponse:
        return ReplyResponse(
            await inference.handle("v1", model, None, request.scope["headers"], request.receive)
        )

    @api.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics() -> Response:
        registry = state.metrics.registry
        if siblings is None:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(await siblings.exposition(registry), media_type=CONTENT_TYPE_LATEST)

    # The alerts' runbook_url and the dashboards' panel links point here by default
    # (service/runbooks.py): public operator docs, so the main port serves them.
    @api.get("/runbooks", tags=["monitoring"], summary="The runbooks the alerts link to")
    async def runbook_index() -> dict[str, list[dict[str, str]]]:
        return {"runbooks": books.index("/runbooks")}

    @api.get(
        "/runbooks/{name}",
        tags=["monitoring"],
        summary="One runbook, as markdown",
        response_class=Response,
        responses={
            200: {"content": {MARKDOWN: {}}},
            404: _ERRORS[404] | {"description": "no runbook of that name"},
        },
    )
    async def runbook(name: str) -> Response:
        book = books.get(name)
        if book is None:
            return JsonResponse({"error": f"no runbook {name!r}: GET /runbooks lists them"}, 404)
        # nosniff: a browser shows it as the text it is, whatever the markdown contains.
        return Response(
            book.text, media_type=MARKDOWN, headers={"x-content-type-options": "nosniff"}
        )

    return api
