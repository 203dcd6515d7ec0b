"""HTTP endpoints of the SLO monitor: status, the drift report, and the Alertmanager hook.

    GET  /v1/slo                   per model and SLO: status, observed, samples, objective source;
                                   per model, drift: what it compares, its reference, its status
    GET  /v1/reports/drift         the latest Evidently HTML report (?model=, default the first;
                                   404 until the first drift run, saying what it waits for)
    POST /v1/hooks/alertmanager    Alertmanager v4 webhook -> retrain requests in the outbox

The hook takes the admin bearer token (`admin.token`; the hook is off, 404, while it is null):
no or malformed `Authorization` -> 401, another token -> 403. The body is bounded by
`server.max_body_bytes` and `monitoring.alertmanager.MAX_ALERTS` (413). Firing alerts become
outbox entries deduplicated by fingerprint + `startsAt`; resolved alerts are ignored, alerts for
a model not served here are skipped (listed in the answer). When the outbox cannot be written the
answer is 503 with Retry-After, so Alertmanager sends the group again.

What the 2xx promises is `webhook.hook_ack` (docs/fleet.md): `durable` (202) once the requests
are in this replica's outbox; `delivered` (200) once the retrain receiver has taken them, tried at
once and for at most `webhook.hook_deadline_seconds`, else 503: Alertmanager sends the group again,
to whichever replica the load balancer picks, and the webhook-id is the same on every replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException

from kdgate.monitoring.alertmanager import TooManyAlerts, read_alerts
from kdgate.monitoring.outbox import OutboxUnavailable
from kdgate.service.auth import check_bearer
from kdgate.service.endpoints import JsonResponse
from kdgate.service.errors import InvalidInput, ModelNotFound, NotReady, PayloadTooLarge
from kdgate.service.inference import BodyDeadline, ClientDisconnected, read_body
from kdgate.service.monitoring_runtime import MonitoringRuntime
from kdgate.service.request_log import RequestLog
from kdgate.service.settings import Settings
from kdgate.service.siblings import Siblings

log = logging.getLogger(__name__)

# What the hook asks a client to wait when the outbox cannot take its alerts (seconds).
RETRY_AFTER_SECONDS = 10


def build_slo_router(
    settings: Settings,
    runtime: MonitoringRuntime,
    requests: RequestLog,
    siblings: Siblings | None = None,
) -> APIRouter:
    """The three routes, bound to one app's settings and monitoring runtime (`siblings`: the
    host's other workers, with `--workers`: the status then names the worker that answers)."""
    api = APIRouter(tags=["monitoring"])
    default_model = settings.models[0].name
    served = frozenset(m.name for m in settings.models)

    @api.get("/v1/slo")
    async def slo_status() -> JsonResponse:
        """Per model and SLO: status, observed, objective, kind, source, samples, window; per
        model, drift: status (collecting | waiting | ok | off), features, reference, latest run."""
        if runtime.monitor is None:
            raise NotReady("the SLO monitor is starting")
        requests.settle()  # the latency of every answered request is in the window
        answer: dict[str, Any] = {"slos": runtime.monitor.status(), "drift": runtime.drift_status()}
        if siblings is not None:
            answer["worker"] = siblings.identity()
        return JsonResponse(answer)

    @api.get("/v1/reports/drift", response_class=Response)
    async def drift_report(model: str | None = None) -> Response:
        """The latest Evidently drift report of `model` as HTML (404 until there is one)."""
        name = model or default_model
        if name not in {m.name for m in settings.models}:
            raise ModelNotFound(f"unknown model {name!r}")
        job = runtime.drift_jobs.get(name)
        if job is None:
            reason = runtime.drift_off.get(name, "drift.enabled is false")
            raise HTTPException(404, f"drift is off for {name!r}: {reason}")
        html = job.latest_html
        if html is None and siblings is not None and not siblings.leader.held:
            html = await siblings.drift_report(name)  # the leader runs the drift job
        if html is None:
            # 404, not 503: the server is fine, the report does not exist yet.
            drift = settings.drift
            reference = job.reference.describe()
            if job.latest is not None:
                waiting = "drift.html_report is false (figures: GET /v1/slo)"
            elif not job.reference.ready:
                waiting = f"collecting the reference ({reference})"
            else:
                waiting = f"runs need {drift.min_rows} served rows (reference: {reference})"
            raise HTTPException(
                404,
                f"no drift report for {name!r} yet: {waiting}; runs happen every "
                f"{drift.every_seconds:g} s",
            )
        return Response(html, media_type="text/html; charset=utf-8")

    body_deadline = BodyDeadline(settings.server.body_timeout_seconds)
    webhook = settings.webhook

    @api.post("/v1/hooks/alertmanager")
    async def alertmanager_hook(request: Request) -> JsonResponse:
        """Queue one retrain request per new firing alert (fingerprint + startsAt); with
        `hook_ack: delivered`, deliver them before answering."""
        token = settings.admin.token
        if token is None:
            raise HTTPException(404, "the Alertmanager hook is off: set admin.token")
        check_bearer(request.headers.get("authorization"), token)
        declared = request.headers.get("content-length")
        try:
            body = await read_body(
                request.receive,
                settings.server.max_body_bytes,
                None if declared is None else declared.encode("latin-1"),
                body_deadline,
            )
        except ClientDisconnected:
            raise InvalidInput("the client went away before the body ended") from None
        captures = await runtime.captures()
        try:
            payload = orjson.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            batch = read_alerts(payload, served=served, captures=captures)
        except TooManyAlerts as exc:
            raise PayloadTooLarge(str(exc)) from None
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            raise InvalidInput(f"not an Alertmanager v4 webhook body: {exc}") from None
        for skipped in batch.skipped:
            log.warning("Alertmanager alert %d skipped: %s", skipped.index, skipped.reason)
        queued = []
        try:
            outbox = await asyncio.to_thread(runtime.hook_outbox)
            for item in batch.requests:
                entry = await asyncio.to_thread(
                    outbox.enqueue,
                    item.payload,
                    dedup_key=item.dedup_key,
                    model=item.model,
                    slo=item.slo,
                    entry_id=item.message_id,
                )
                if entry is not None:
                    queued.append(entry)
        except OutboxUnavailable as exc:
            # 503, not 500: Alertmanager retries the whole group, and the alerts already queued
            # are duplicates by their dedup key, so nothing is lost or sent twice.
            log.error("Alertmanager hook: %s; answered 503", exc)
            return JsonResponse(
                {"error": f"the retrain outbox cannot take requests now: {exc}"},
                status_code=503,
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            )
        finally:
            if queued and webhook.hook_ack == "durable":
                runtime.wake_notifier()
        answer = {
            "queued": queued,
            "duplicates": len(batch.requests) - len(queued),
            "skipped": [dataclasses.asdict(s) for s in batch.skipped],
        }
        if webhook.hook_ack == "durable":
            return JsonResponse(answer, status_code=202)
        return await _delivered(answer, [item.message_id for item in batch.requests])

    async def _delivered(answer: dict[str, Any], entry_ids: list[str]) -> JsonResponse:
        """hook_ack delivered: 200 once the receiver took every request, else 503."""
        notifier = runtime.hook_notifier()
        if notifier is None:
            raise NotReady("the retrain webhook notifier is starting")
        try:
            taken = await notifier.deliver_now(entry_ids, webhook.hook_deadline_seconds)
        except OutboxUnavailable as exc:
            log.error("Alertmanager hook: %s; answered 503", exc)
            taken = set()
        waiting = [entry_id for entry_id in entry_ids if entry_id not in taken]
        if not waiting:
            return JsonResponse({**answer, "delivered": entry_ids}, status_code=200)
        # Kept in this outbox too (the notifier retries it), but what makes it safe to lose this
        # replica is that Alertmanager keeps sending the alert until some replica answers 2xx.
        log.warning(
            "Alertmanager hook: the retrain receiver did not take %s within %g s; answered 503",
            ", ".join(waiting),
            webhook.hook_deadline_seconds,
        )
        return JsonResponse(
            {
                "error": f"the retrain receiver did not take {len(waiting)} of {len(entry_ids)} "
                f"requests within {webhook.hook_deadline_seconds:g} s; send the alerts again",
                **answer,
                "delivered": [entry_id for entry_id in entry_ids if entry_id in taken],
                "waiting": waiting,
            },
            status_code=503,
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )

    return api
