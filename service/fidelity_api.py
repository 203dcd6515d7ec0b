"""Fidelity routes: ground-truth feedback in, the recent fidelity window out.

    POST /v2/models/{m}/feedback   [{"id": ..., "label": ...}, ...] -> what was joined, and why not
    GET  /v1/fidelity[?model=m]    per model: agreement, mean KL, ECE vs teacher and vs labels,
                                   label accuracy of student and teacher, samples, P95 latency

Both read the app's `MonitoringRuntime` (service/monitoring_runtime.py); the fidelity figures
come from its recent window, the one `GET /v1/slo` reads. Neither is on the inference hot path.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson
from fastapi import APIRouter, Request

from kdgate.monitoring.recent import Figures
from kdgate.service.endpoints import JsonResponse
from kdgate.service.errors import InvalidInput, NotReady
from kdgate.service.inference import read_body
from kdgate.service.monitoring_runtime import ModelMonitoring, MonitoringRuntime
from kdgate.service.request_log import RequestLog
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
_NOT_A_LIST = 'expected a JSON array of {"id": "<request id>", "label": <class>} objects'


def build_fidelity_router(
    state: ServingState, runtime: MonitoringRuntime, log: RequestLog
) -> APIRouter:
    """The feedback and fidelity routes, bound to one app's monitoring runtime."""
    api = APIRouter()

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
        )
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"malformed JSON ({exc}); {_NOT_A_LIST}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise InvalidInput(_NOT_A_LIST)
        log.settle()  # every answered request is in the store before the join
        return JsonResponse(monitoring.feedback.apply_feedback(items))

    @api.get("/v1/fidelity", tags=["monitoring"])
    async def fidelity(model: str | None = None) -> JsonResponse:
        """Fidelity over the recent window (`slo.window_seconds`); null where no samples."""
        names = [model] if model is not None else list(state.versions)
        running_models = {name: running(name) for name in names}
        log.settle()  # the latency of every answered request is in the window
        return JsonResponse(
            {
                "window_seconds": runtime.window.window_seconds,
                "models": {
                    name: _summary(runtime, state, monitoring)
                    for name, monitoring in running_models.items()
                },
            }
        )

    return api


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
