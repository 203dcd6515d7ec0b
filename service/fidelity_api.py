"""Fidelity routes: ground-truth feedback in, the recent fidelity window out.

    POST /v2/models/{m}/feedback   [{"id": ..., "label": ...}, ...] -> what was joined, and why not
    GET  /v1/fidelity[?model=m]    per model: agreement, mean KL, ECE vs teacher and vs labels,
                                   label accuracy of student and teacher, samples, P95 latency

Both read the app's `MonitoringRuntime` (service/monitoring_runtime.py); the fidelity figures
come from its recent window, the one `GET /v1/slo` reads. Neither is on the inference hot path.

With several workers (`kdgate serve --workers N`), labels whose ids this worker did not serve
are passed to the other workers (service/siblings.py), so no label is lost to the worker that
happened to receive it; `/v1/fidelity` is the answering worker's window and says which worker
that is (`worker`); Prometheus is the host-exact view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import orjson
from fastapi import APIRouter, Request

from kdgate.monitoring.recent import Figures
from kdgate.service.endpoints import JsonResponse
from kdgate.service.errors import InvalidInput, NotReady
from kdgate.service.inference import BodyDeadline, read_body
from kdgate.service.monitoring_runtime import ModelMonitoring, MonitoringRuntime
from kdgate.service.request_log import RequestLog
from kdgate.service.siblings import Siblings
from kdgate.service.state import ServingState

_FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "label"],
                        "properties": {
                            "id": {"type": "string", "description": "the request's id"},
                            "label": {
                                "description": "class index or class label; a list of them, one "
                                "per row, for a multi-row request",
                            },
                        },
                    },
                }
            }
        },
    }
}
_SLICE_BYTES = 256 * 1024  # parsed at once: ~3 ms of the event loop here
_JOIN_ITEMS = 2048  # labels joined at once: ~5 ms of the event loop here
_NOT_A_LIST = 'expected a JSON array of {"id": "<request id>", "label": <class>} objects'


def build_fidelity_router(
    state: ServingState,
    runtime: MonitoringRuntime,
    log: RequestLog,
    siblings: Siblings | None = None,
) -> APIRouter:
    """The feedback and fidelity routes, bound to one app's monitoring runtime (`siblings`:
    the host's other workers, with `--workers`)."""
    api = APIRouter()
    body_deadline = BodyDeadline(state.settings.server.body_timeout_seconds)

    def running(model: str) -> ModelMonitoring:
        state.check_version(model, None)
        monitoring = runtime.model(model)
        if monitoring is None:
            raise NotReady(f"model {model!r} is loading; retry when /v2/health/ready says ready")
        return monitoring

    @api.post("/v2/models/{model}/feedback", tags=["v2"], openapi_extra=_FEEDBACK_BODY)
    async def feedback(model: str, request: Request) -> JsonResponse:
        """Join labels to recent predictions by request id. Unknown, expired, duplicate and
        invalid ids are listed in the answer (200), not treated as errors."""
        monitoring = running(model)
        body = await read_body(
            request.receive,
            state.settings.server.max_body_bytes,
            request.headers.get("content-length", "").encode() or None,
            body_deadline,
        )
        items = await parse_feedback(body)
        answer = await join_feedback(monitoring, log, items)
        if siblings is not None and answer["unknown"]:
            unknown = set(answer["unknown"])
            elsewhere = await siblings.feedback(
                model, [item for item in items if item.get("id") in unknown]
            )
            if elsewhere is not None:
                answer["unknown"] = elsewhere.pop("unknown")
                for key, value in elsewhere.items():
                    answer[key] += value
        return JsonResponse(answer)

    @api.get("/v1/fidelity", tags=["monitoring"])
    async def fidelity(model: str | None = None) -> JsonResponse:
        """Fidelity over the recent window (`slo.window_seconds`); null where no samples."""
        names = [model] if model is not None else list(state.versions)
        running_models = {name: running(name) for name in names}
        log.settle()  # the latency of every answered request is in the window
        answer: dict[str, Any] = {
            "window_seconds": runtime.window.window_seconds,
            "models": {
                name: _summary(runtime, state, monitoring)
                for name, monitoring in running_models.items()
            },
        }
        if siblings is not None:
            answer["worker"] = siblings.identity()
        return JsonResponse(answer)

    return api


async def join_feedback(
    monitoring: ModelMonitoring, log: RequestLog, items: list[dict[str, Any]]
) -> dict[str, Any]:
    """Join labels to the predictions this process served (see FeedbackStore.apply_feedback)."""
    log.settle()  # every answered request is in the store before the join
    # A few MB of labels take ~0.2 s to join here: in slices, letting requests run between.
    join = monitoring.feedback.apply_feedback
    answer = join(items[:_JOIN_ITEMS])
    for start in range(_JOIN_ITEMS, len(items), _JOIN_ITEMS):
        await asyncio.sleep(0)
        for key, value in join(items[start : start + _JOIN_ITEMS]).items():
            answer[key] += value  # counts add up, id lists extend
    return answer


async def parse_feedback(body: bytes) -> list[dict[str, Any]]:
    """The feedback body as a list of objects; a large one is parsed a slice at a time, with
    requests running in between (see `_slices`)."""
    if len(body) > _SLICE_BYTES:
        parsed: list[dict[str, Any]] = []
        for piece in _slices(body):
            try:
                items = orjson.loads(piece)
            except orjson.JSONDecodeError:
                break
            if not isinstance(items, list) or not all(type(i) is dict for i in items):
                break
            parsed += items
            await asyncio.sleep(0)
        else:
            return parsed
    # Small, cut where no element ended, or bad: the whole body gives the items or the error.
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON ({exc}); {_NOT_A_LIST}") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InvalidInput(_NOT_A_LIST)
    return items


def _slices(body: bytes) -> Iterator[bytes]:
    """`body` cut after a `},` about every `_SLICE_BYTES`, each slice made a JSON array.

    Parsing 4 MB holds the event loop ~50 ms here; a slice, ~3 ms. A cut is only right between
    two elements of the top-level array, and a slice whose cut is anywhere else is not valid
    JSON: a `}` inside a string leaves that string open, and one closing a nested object leaves
    a bracket open. So when every slice parses to a list, the lists joined are the body's.
    """
    view = memoryview(body)
    start = 0
    while (cut := body.find(b"},", start + _SLICE_BYTES)) >= 0:
        yield b"".join((b"[" if start else b"", view[start : cut + 1], b"]"))
        start = cut + 2
    yield b"".join((b"[" if start else b"", view[start:]))


def _summary(
    runtime: MonitoringRuntime, state: ServingState, monitoring: ModelMonitoring
) -> dict[str, Any]:
    window = runtime.window
    name = monitoring.name
    worker = monitoring.worker
    return {
        **_figures(window.figures(name)),
        "shadow": {
            "fraction": monitoring.shadow.fraction if worker else 0.0,
            "teacher": f"{worker.teacher.name}:{worker.teacher.version}" if worker else None,
            "queue_rows": worker.queue.rows if worker else 0,
            "breaker": monitoring.breaker.state if monitoring.breaker else None,
        },
        "versions": {
            version: _figures(window.figures(name, version)) for version in state.versions[name]
        },
    }


def _figures(figures: Figures) -> dict[str, Any]:
    summary = asdict(figures)
    del summary["requests"]  # what P95 is over; the request counters say it better
    return summary
