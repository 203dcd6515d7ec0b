"""The other workers of this host, reached over their private Unix sockets.

    <run dir, 0700>/worker-<i>.sock       one per worker, served by `private_app`
        GET  /families                     this worker's metric families (service/exposition.py)
        POST /feedback/{model}             join labels to predictions this worker served
        GET  /drift-report/{model}         the drift report, from the worker that runs drift

With `kdgate serve --workers N`, any worker may answer a scrape or a label:
- `exposition` merges the families of every worker that answers within `deadline_seconds`
  (2 s in all, not per sibling), so one scrape is the host's exact counters and histograms. A
  sibling that does not answer (restarting, stuck) is counted in
  `kdgate_workers_scrape_errors_total{worker}` and logged; the scrape still answers.
- `feedback` passes the labels whose ids this worker does not hold to the siblings in turn,
  within the same kind of total deadline: a label is unknown only if no worker served its id.
- `drift_report` fetches the leader's latest drift report for a worker that runs no drift job.

The sockets live in a directory only the server's user can enter (the supervisor makes it), so
nothing else on the host reaches these routes; they are never served on a TCP port.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.types import Receive, Scope, Send

from kdgate.service.exposition import Families, Family, families_of, merge
from kdgate.service.leader import HostLeader

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 2.0  # a whole scrape or feedback hand-off, however many siblings
MAX_PRIVATE_BODY = 64 * 1024 * 1024  # a sibling's answer or a feedback hand-off (bounded)

FeedbackJoin = Callable[[str, list[dict[str, Any]]], Awaitable[dict[str, Any] | None]]
DriftHtml = Callable[[str], bytes | None]


@dataclass(frozen=True)
class Place:
    """Where a worker is: its index among `count` workers and the run directory of the sockets."""

    index: int
    count: int
    run_dir: Path

    def socket(self, index: int) -> Path:
        """The private socket of worker `index`."""
        return self.run_dir / f"worker-{index}.sock"

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


class Siblings:
    """This worker's view of the host: its place, the leader lock, clients to the others.

    `registry` receives `kdgate_workers_scrape_errors_total`; close with `aclose`.
    """

    def __init__(
        self,
        place: Place,
        leader: HostLeader,
        registry: CollectorRegistry,
        *,
        deadline_seconds: float = DEADLINE_SECONDS,
    ) -> None:
        self.place = place
        self.leader = leader
        self.deadline_seconds = deadline_seconds
        self.scrape_errors = Counter(
            "kdgate_workers_scrape_errors",
            "Scrapes of this host that lacked a worker's metrics (it did not answer in time).",
            ["worker"],
            registry=registry,
        )
        self._clients = {
            i: httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(place.socket(i))),
                base_url="http://worker",
                trust_env=False,
            )
            for i in place.others
        }

    def identity(self) -> dict[str, Any]:
        """Which worker answers (for `/v1/fidelity` and `/v1/slo`)."""
        return {
            "index": self.place.index,
            "of": self.place.count,
            "pid": os.getpid(),
            "leader": self.leader.held,
        }

    async def exposition(self, registry: CollectorRegistry) -> bytes:
        """The Prometheus text of the whole host: this worker's `registry` merged with every
        sibling that answers in time (a missing one is counted and logged, never waited for)."""
        answers = await self._gather(lambda client: client.get("/families"))
        workers: list[list[Family]] = []
        leader: int | None = 0 if self.leader.held else None
        for index in self.place.others:
            answer = answers.get(index)
            if answer is None:
                self.scrape_errors.labels(str(index)).inc()
                continue
            if answer.get("leader"):
                leader = len(workers) + 1  # the local worker comes first
            workers.append(answer["families"])
        local = families_of(registry)  # after the error counts, so this scrape shows them
        merged = merge([local, *workers], leader=leader)
        merged.append(
            _gauge(
                "kdgate_workers_scraped",
                "Workers whose metrics are in this scrape (of kdgate_workers_configured).",
                1 + len(workers),
            )
        )
        merged.append(
            _gauge(
                "kdgate_workers_configured",
                "Worker processes serving this host (--workers).",
                self.place.count,
            )
        )
        return generate_latest(Families(merged))

    async def feedback(self, model: str, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Offer `items` (labels whose ids this worker does not hold) to each sibling in turn;
        the combined answer, or None when no sibling answered."""
        deadline = asyncio.get_running_loop().time() + self.deadline_seconds
        combined: dict[str, Any] | None = None
        pending = items
        for index in self.place.others:
            if not pending:
                break
            left = deadline - asyncio.get_running_loop().time()
            body = orjson.dumps(pending)
            answer = await self._call(index, partial(_post, f"/feedback/{model}", body), left)
            if answer is None:
                continue
            if combined is None:
                combined = {**answer, "unknown": []}
            else:
                for key, value in answer.items():
                    if key != "unknown":
                        combined[key] += value
            still = set(answer["unknown"])  # ids: strings (the others were "invalid" here)
            pending = [item for item in pending if item.get("id") in still]
        if combined is not None:
            combined["unknown"] = [item.get("id") for item in pending]
        return combined

    async def drift_report(self, model: str) -> bytes | None:
        """The latest drift report of `model` held by a sibling (the leader), or None."""
        answers = await self._gather(lambda client: client.get(f"/drift-report/{model}"))
        found = next((a["html"] for a in answers.values() if a.get("html") is not None), None)
        return None if found is None else base64.b64decode(found)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def _gather(
        self, request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
    ) -> dict[int, dict[str, Any]]:
        tasks = {
            index: asyncio.create_task(self._call(index, request, self.deadline_seconds))
            for index in self.place.others
        }
        if tasks:
            await asyncio.wait(tasks.values())  # each call ends by its own deadline
        return {i: answer for i, task in tasks.items() if (answer := task.result()) is not None}

    async def _call(
        self,
        index: int,
        request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
        seconds: float,
    ) -> dict[str, Any] | None:
        """One request to sibling `index` within `seconds` in all; None (logged) on failure."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                response = await request(self._clients[index])
            response.raise_for_status()
            answer: dict[str, Any] = orjson.loads(response.content)
            return answer
        except TimeoutError:
            log.warning("worker %d did not answer within %.1f s", index, seconds)
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
            log.warning("worker %d: %s", index, exc or type(exc).__name__)
        return None


async def _post(path: str, body: bytes, client: httpx.AsyncClient) -> httpx.Response:
    return await client.post(path, content=body)


def _gauge(name: str, help_text: str, value: float) -> Family:
    return {
        "name": name,
        "type": "gauge",
        "help": help_text,
        "unit": "",
        "samples": [[name, {}, repr(float(value))]],
    }


def private_app(
    place: Place,
    leader: HostLeader,
    registry: CollectorRegistry,
    join: FeedbackJoin,
    drift_html: DriftHtml,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app of a worker's private socket (`join`: the feedback join of this worker's
    app, None for a model it does not run; `drift_html`: its latest drift report of a model)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to set up
        path, method = scope["path"], scope["method"]
        status = 404
        answer: dict[str, Any] = {"error": f"no private route {method} {path}"}
        if method == "GET" and path == "/families":
            status = 200
            answer = {
                "worker": place.index,
                "pid": os.getpid(),
                "leader": leader.held,
                "families": families_of(registry),
            }
        elif method == "GET" and path.startswith("/drift-report/"):
            html = drift_html(path.removeprefix("/drift-report/"))
            status = 200
            answer = {"html": None if html is None else base64.b64encode(html).decode()}
        elif method == "POST" and path.startswith("/feedback/"):
            try:
                items = orjson.loads(await _body(receive))
            except ValueError as exc:
                items, answer = None, {"error": f"bad feedback hand-off: {exc}"}
            if isinstance(items, list):
                joined = await join(path.removeprefix("/feedback/"), items)
                status, answer = (200, joined) if joined is not None else (503, answer)
                if joined is None:
                    answer = {"error": "model not running on this worker"}
            else:
                status = 400
        payload = orjson.dumps(answer)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_PRIVATE_BODY:
            raise ValueError("private request body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
