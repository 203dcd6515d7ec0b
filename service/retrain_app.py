"""`kdgate retrain-worker`: the receiver of the signed retrain request, and its job status.

    POST /webhook     the retrain request, Standard Webhooks signed (monitoring/webhook.py)
    GET  /jobs        the newest jobs (status, stage, version, error) and counts per status
    GET  /jobs/{seq}  one job
    GET  /healthz     {"status": "ok"} while the queue file can be read
    GET  /metrics     Prometheus (service/retrain_metrics.py)

POST /webhook answers, in this order: 413 for a body over `max_body_bytes`; 401 unless a
signature matches and `webhook-timestamp` is within `tolerance_seconds` (checked on the raw
body, before parsing); 400 for a body that is not a JSON object with a string `type`; 200
`{"ignored": type}` for another event type (`rollout.*`: the gateway's own notices); 400 for a
retrain request without `data.model`; then the job is stored durably and the answer is 202
`{"job", "status": "queued"}` at once (200 with `"duplicate": true` for a webhook-id already
stored: acknowledged, not run again). A follow-up (`data.follows`) or a model with no `models:`
entry is stored as `ignored` with the reason and answered 200: the sender must not retry it.
503 when the queue cannot be written: the sender retries later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kdgate.monitoring.webhook import EVENT_TYPE, verify
from kdgate.service.retrain_config import (
    CONFIG_ENV_VAR,
    RetrainWorkerSettings,
    load_worker_settings,
)
from kdgate.service.retrain_gateway import Gateway
from kdgate.service.retrain_metrics import WorkerMetrics
from kdgate.service.retrain_queue import JobQueue
from kdgate.service.retrain_runner import JobRunner

log = logging.getLogger("kdgate.retrain")

QUEUE_FILE = "jobs.sqlite3"
BODY_TIMEOUT_SECONDS = 10.0  # a request body still arriving after this: 408


class TooLarge(Exception):
    pass


def create_worker_app(
    settings: RetrainWorkerSettings,
    *,
    client: httpx.AsyncClient | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The worker's app; its lifespan runs the job runner. `client` calls the gateway (default:
    one on `gateway.url` with the bearer token, closed at shutdown)."""
    registry = registry or CollectorRegistry()
    metrics = WorkerMetrics(registry)
    queue = JobQueue(settings.work_dir / QUEUE_FILE)
    own_client = client is None
    if client is None:
        token = settings.gateway.token.get_secret_value()
        client = httpx.AsyncClient(
            base_url=settings.gateway.url, headers={"authorization": f"Bearer {token}"}
        )
    gateway = Gateway(client, timeout_seconds=settings.gateway.timeout_seconds)
    runner = JobRunner(settings, queue, gateway, metrics)
    secret = settings.secret.get_secret_value()

    def answer(outcome: str, status: int, body: dict[str, Any]) -> JSONResponse:
        metrics.webhooks.labels(outcome=outcome).inc()
        return JSONResponse(body, status_code=status)

    async def webhook(request: Request) -> Response:
        try:
            async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
                body = await _read_limited(request, settings.max_body_bytes)
        except TooLarge:
            return answer("too_large", 413, {"error": "body over max_body_bytes"})
        except TimeoutError:
            return answer("bad_request", 408, {"error": "the body took too long to arrive"})
        if not verify(secret, request.headers, body, tolerance_seconds=settings.tolerance_seconds):
            log.warning("webhook refused: bad or missing signature, or a stale timestamp")
            return answer("unauthorized", 401, {"error": "bad signature or timestamp"})
        try:
            event = json.loads(body)
        except ValueError:
            return answer("bad_request", 400, {"error": "the body is not JSON"})
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(kind, str):
            return answer("bad_request", 400, {"error": "expected a JSON object with a 'type'"})
        if kind != EVENT_TYPE:
            return answer("ignored", 200, {"ignored": kind})
        data = event.get("data")
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or not model:
            return answer("bad_request", 400, {"error": "data.model must be a model name"})
        assert isinstance(data, dict)
        reason = None
        if data.get("follows"):
            reason = f"a follow-up of {data['follows']}: the job of that request covers it"
        elif model not in settings.models:
            reason = f"no retrain is configured for model {model!r} (models: in the config)"
        webhook_id = request.headers["webhook-id"]
        try:
            job, new = await asyncio.to_thread(
                queue.add,
                webhook_id,
                model,
                json.dumps(event),
                status="ignored" if reason else "queued",
                error=reason,
            )
        except Exception as exc:  # a full disk, an unwritable directory: the sender retries
            log.error("webhook %s: cannot store the job: %s", webhook_id, exc)
            return answer("unavailable", 503, {"error": "the job queue cannot be written"})
        summary = {"job": job.name, "status": job.status}
        if not new:
            return answer("duplicate", 200, {**summary, "duplicate": True})
        if reason:
            log.info("webhook %s (model %s) ignored: %s", webhook_id, model, reason)
            return answer("ignored", 200, {**summary, "ignored": reason})
        log.info("webhook %s (model %s) queued as %s", webhook_id, model, job.name)
        runner.wake()
        return answer("accepted", 202, summary)

    async def jobs(request: Request) -> Response:
        found = await asyncio.to_thread(queue.jobs)
        counts = await asyncio.to_thread(queue.counts)
        return JSONResponse({"jobs": [j.summary() for j in found], "counts": counts})

    async def one_job(request: Request) -> Response:
        seq = request.path_params["seq"]
        job = await asyncio.to_thread(queue.get, seq)
        if job is None:
            return JSONResponse({"error": f"no job {seq}"}, status_code=404)
        return JSONResponse(job.summary())

    async def healthz(request: Request) -> Response:
        try:
            await asyncio.to_thread(queue.counts)
        except Exception as exc:
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(runner.run(), name="retrain-runner")
        log.info("retrain worker: models %s, work dir %s, gateway %s",
                 sorted(settings.models), settings.work_dir, settings.gateway.url)  # fmt: skip
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if own_client:
                await client.aclose()

    routes = [
        Route("/webhook", webhook, methods=["POST"]),
        Route("/jobs", jobs, methods=["GET"]),
        Route("/jobs/{seq:int}", one_job, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        parts.append(chunk)
    return b"".join(parts)


def main(argv: list[str]) -> int:
    """`kdgate retrain-worker [--config FILE]`: run the worker until SIGINT/SIGTERM; a bad
    config is one line on stderr (no value from it: it may hold a secret) and exit 2."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="kdgate retrain-worker",
        description="Receive signed retrain requests, retrain, register and start a rollout.",
    )
    parser.add_argument("--config", type=Path, help=f"YAML file (default: ${CONFIG_ENV_VAR})")
    args = parser.parse_args(argv)
    try:
        settings = load_worker_settings(args.config)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        return _refuse(args.config, problems)
    except yaml.YAMLError as exc:
        return _refuse(args.config, f"not valid YAML ({type(exc).__name__})")
    except OSError as exc:
        return _refuse(args.config, exc.strerror or type(exc).__name__)
    except ValueError as exc:
        return _refuse(args.config, str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_worker_app(settings)
    config = uvicorn.Config(
        app, host=settings.listen.host, port=settings.listen.port, log_level="info"
    )
    uvicorn.Server(config).run()
    return 0


def _refuse(config: Path | None, reason: str) -> int:
    print(f"kdgate retrain-worker: {config or CONFIG_ENV_VAR}: {reason}", file=sys.stderr)
    return 2
