"""The inference request handler both front doors share (raw ASGI fast path and FastAPI route).

    headers + body -> route to a variant -> decode + validate -> run the student -> encode

It returns a `Reply` (status, raw headers, body) instead of writing to a socket so that the
fast path can send it with two ASGI messages and the FastAPI route can wrap it in a Response.

The request's bookkeeping (metrics, drift tap, shadow and feedback) is `Reply.after`, which
each front door calls once the response is sent: it appends one `Served` row to the app's
request log (service/request_log.py), which settles rows into their consumers in bulk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass
from random import getrandbits
from time import monotonic, perf_counter
from typing import Any

from kdgate.service import protocol_v1, protocol_v2
from kdgate.service.errors import (
    InvalidInput,
    KdgateError,
    PayloadTooLarge,
    RequestTimeout,
    error_body,
)
from kdgate.service.request_log import RequestLog
from kdgate.service.routing import Variant
from kdgate.service.state import ServingState
from kdgate.service.tracer import NO_TRACER, Tracer

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
RawHeaders = list[tuple[bytes, bytes]]
# The fields of a `Served` row but the last, `answered` (known once the reply is sent).
ServedSoFar = tuple[str, str, Variant | None, int, float, str, Mapping[str, Any], Any, Any]

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
NO_VERSION = b"none"
REQUEST_ID = b"x-request-id"
MODEL_VERSION = b"x-kdgate-model-version"

# uuid4 layout: version nibble 4, variant bits 10.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> str:
    """A random uuid4 as 32 hex digits.

    Built from `random.getrandbits` (~0.3 us) rather than `uuid.uuid4()` (~5 us measured here):
    request ids must be unique, not unguessable.
    """
    return f"{(getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"


def request_ids(batch: int = 256) -> Iterator[str]:
    """Endless `new_request_id()`s, made `batch` at a time.

    One id made between two requests costs ~4 us of server CPU (its code is cold by then);
    made in a batch, ~0.5 us each plus ~0.2 us to take one. Not thread-safe: one per event loop.
    """
    while True:
        yield from [new_request_id() for _ in range(batch)]


class ClientDisconnected(Exception):
    """The client went away before its body arrived; nothing is sent back."""


@dataclass(slots=True)
class Reply:
    """An HTTP response ready to send: status, raw ASGI headers and body; then `after()`.

    `after()` logs the request for its bookkeeping (see the module doc). A front door calls it
    right after sending the response.
    """

    status: int
    headers: RawHeaders
    body: bytes
    log: RequestLog
    served: ServedSoFar

    def after(self) -> None:
        """Log the answered request (its latency ends now)."""
        self.log.record(self.served + (perf_counter(),))  # noqa: RUF005  (concat: no list built)


class BodyDeadline:
    """The time a request body may take to arrive in all (`server.body_timeout_seconds`), kept
    for every `read_body` of one app by one sweep timer.

    A read registers in a dict (~1 us) rather than arming a timer of its own (`call_later` +
    `cancel`, ~3 us with uvloop here; `asyncio.wait_for`, ~12). The usual body is there at the
    first receive(), so the read is over before any sweep; while reads are pending, a sweep every
    quarter of the deadline cancels those past it, so a stalled read ends within 1.25 deadlines.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._reading: dict[asyncio.Task[Any], float] = {}  # task -> monotonic start
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, task: asyncio.Task[Any]) -> None:
        """`task` begins reading a body now."""
        self._reading[task] = monotonic()
        if self._sweep is None or self._loop is not asyncio.get_running_loop():
            self._arm()

    def stop(self, task: asyncio.Task[Any]) -> None:
        """`task` is done reading, whichever way."""
        self._reading.pop(task, None)

    def cut(self, task: asyncio.Task[Any]) -> bool:
        """Whether the deadline cancelled `task` (once: the answer is taken, not kept)."""
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _arm(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sweep = self._loop.call_later(self.seconds / 4, self._check)

    def _check(self) -> None:
        self._sweep = None
        now = monotonic()
        late = [task for task, started in self._reading.items() if now - started >= self.seconds]
        for task in late:
            del self._reading[task]
            self._expired.add(task)
            task.cancel()
        if self._reading:
            self._arm()


async def read_body(
    receive: Receive,
    limit: int,
    declared: bytes | None,
    deadline: BodyDeadline,
    task: asyncio.Task[Any] | None = None,
) -> bytes:
    """The request body, refusing to read more than `limit` bytes (413) or for longer than the
    `deadline` (408), so that a client that stops sending cannot hold a request for good.

    `task` is the current task when the caller already has it: looking it up again costs ~1.5k
    instructions per request (`asyncio.current_task` is Python code on 3.11).
    """
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidInput(f"content-length {declared!r} is not a byte count") from None
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit")
    if task is None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("read_body must run in an asyncio task")
    deadline.start(task)
    try:
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body: bytes = message.get("body", b"")  # the usual case: the whole body at once
            if len(body) > limit:
                raise PayloadTooLarge(f"body is over the {limit}-byte limit")
            return body
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body is over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            message = await receive()
    except asyncio.CancelledError:
        if not deadline.cut(task):
            raise  # cancelled from outside (a shutdown): not ours to answer
        task.uncancel()
        raise RequestTimeout(
            f"the request body did not arrive within {deadline.seconds:g} s "
            "(server.body_timeout_seconds)"
        ) from None
    finally:
        deadline.stop(task)


class Inference:
    """Serves `POST /v2/models/{m}[/versions/{v}]/infer` and `POST /v1/models/{m}:predict`."""

    def __init__(self, state: ServingState, log: RequestLog, tracer: Tracer = NO_TRACER) -> None:
        self.state = state
        self.log = log
        self.tracer = tracer
        self.limit = state.settings.server.max_body_bytes
        self.body_deadline = BodyDeadline(state.settings.server.body_timeout_seconds)
        self.new_request_id = request_ids().__next__
        # The request span's context travels in the Served row, for the shadow comparison's link.
        self._trace_context = tracer.context if tracer.enabled else None

    async def handle(
        self,
        protocol: str,
        model: str,
        version: str | None,
        raw_headers: Iterable[tuple[bytes, bytes]],
        receive: Receive,
        task: asyncio.Task[Any] | None = None,
    ) -> Reply:
        """Answer one inference request; every outcome, good or bad, is a `Reply`.

        `task`: the request's own task, when the caller has looked it up already (the overload
        guard has), so that the body read does not look it up again.
        """
        started = perf_counter()
        headers = dict(raw_headers)
        request_id = headers.get(REQUEST_ID, b"").decode("latin-1") or None
        if request_id is not None and not protocol_v2.valid_request_id(request_id):
            request_id = None
        variant: Variant | None = None
        json_length: int | None = None
        error_headers: Sequence[tuple[bytes, bytes]] = ()
        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        try:
            router = self.state.routers.get(model)
            if router is None:  # unknown (404) or still loading (503)
                self.state.check_version(model, version)
                router = self.state.router(model)
            variant = (
                router.get(version) if version else router.pick(headers.get(router.sticky_header))
            )
            body = await read_body(
                receive,
                self.limit,
                headers.get(b"content-length"),
                self.body_deadline,
                task,
            )
            if protocol == "v2":
                header_length = headers.get(b"inference-header-content-length")
                request = protocol_v2.decode_request(
                    body,
                    # Checked only when sent: a JSON-only request makes no call for it.
                    None
                    if header_length is None
                    else protocol_v2.parse_header_length(header_length, len(body)),
                    variant.signature,
                )
                request_id = answer_id = request.id or request_id or self.new_request_id()
                inputs = request.inputs
            else:
                inputs = protocol_v1.decode_request(body, variant.signature)
            batcher = variant.batcher
            if batcher is None or batcher.inline():
                outputs = variant.run(inputs)
            else:
                outputs = await batcher.run(inputs)
            if protocol == "v2":
                payload, json_length = protocol_v2.encode_response(
                    model_name=model,
                    model_version=variant.version,
                    request_id=answer_id,
                    outputs=outputs,
                    requested=request.outputs,
                )
            else:
                payload = protocol_v1.encode_response(outputs, variant.signature)
            status = 200
        except KdgateError as exc:
            status, payload, error_headers = exc.status_code, error_body(exc.message), exc.headers
        except ClientDisconnected:
            raise
        except Exception:
            # A bug or a runtime failure, never the caller's input (that is InvalidInput).
            request_id = request_id or self.new_request_id()  # the line names the answer's id
            log.exception(
                "inference failed: model=%s version=%s",
                model,
                version,
                extra={"request_id": request_id},
            )
            status, payload = 500, error_body("internal error while running the model")
        request_id = request_id or self.new_request_id()
        reply_headers: RawHeaders = [
            (b"content-type", JSON if json_length is None else OCTET_STREAM),
            (b"content-length", str(len(payload)).encode()),
            variant.version_header if variant else (MODEL_VERSION, NO_VERSION),
            (REQUEST_ID, request_id.encode()),
        ]
        if json_length is not None:
            reply_headers.append((b"inference-header-content-length", str(json_length).encode()))
        if error_headers:
            reply_headers.extend(error_headers)
        trace = self._trace_context() if self._trace_context is not None else None
        served: ServedSoFar = (
            protocol,
            model,
            variant,
            status,
            started,
            request_id,
            inputs,
            outputs if status == 200 else None,
            trace,
        )
        return Reply(status, reply_headers, payload, self.log, served)


class TracedInference(Inference):
    """`Inference` with each request in its tracer's request span (the app builds this one when
    tracing is on, so the untraced path carries no tracing branch but one `is None` check)."""

    async def handle(
        self,
        protocol: str,
        model: str,
        version: str | None,
        raw_headers: Iterable[tuple[bytes, bytes]],
        receive: Receive,
        task: asyncio.Task[Any] | None = None,
    ) -> Reply:
        headers = list(raw_headers)
        with self.tracer.request(model, protocol, headers) as span:
            reply = await super().handle(protocol, model, version, headers, receive, task)
            served = next((v for k, v in reply.headers if k == MODEL_VERSION), b"")
            span.answered(reply.status, served.decode("latin-1"))
            return reply
