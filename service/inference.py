"""The inference request handler both front doors share (raw ASGI fast path and FastAPI route).

    headers + body -> route to a variant -> decode + validate -> run the student -> encode

It returns a `Reply` (status, raw headers, body) instead of writing to a socket so that the
fast path can send it with two ASGI messages and the FastAPI route can wrap it in a Response.
The request's bookkeeping (metrics, drift tap) is `Reply.after`, which each front door calls
once the response is sent: the caller does not wait for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from functools import partial
from random import getrandbits
from time import perf_counter
from typing import Any

from service import protocol_v1, protocol_v2
from service.errors import InvalidInput, KdgateError, PayloadTooLarge, error_body
from service.routing import Variant
from service.state import ServingState

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
RawHeaders = list[tuple[bytes, bytes]]
# (request id, version, inputs, outputs) of a successful prediction.
Observer = Callable[[str, str, Mapping[str, Any], Mapping[str, Any]], None]

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

    `after` records the request (metrics, drift tap, and the shadow and feedback observer). A
    front door calls it right after sending the response, with no await in between: no other
    request runs before it, and the caller does not wait for it (~30 us of a ~250 us request
    here). With tracing on, the observer runs before the reply instead: it links the shadow
    sample to the request's span, which is current only until the reply (service/tracing.py).
    """

    status: int
    headers: RawHeaders
    body: bytes
    after: Callable[[], None]


async def read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes:
    """The request body, refusing (413) to read more than `limit` bytes."""
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidInput(f"content-length {declared!r} is not a byte count") from None
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Inference:
    """Serves `POST /v2/models/{m}[/versions/{v}]/infer` and `POST /v1/models/{m}:predict`."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.limit = state.settings.server.max_body_bytes
        self.new_request_id = request_ids().__next__
        # model -> drift input hook, set by the SLO runtime at startup (service/slo_runtime.py)
        self.input_taps: Mapping[str, Callable[[dict[str, Any]], None]] = {}
        # model -> shadow + feedback hook after a successful run, set by service/shadowing.py
        self.observers: dict[str, Observer] = {}
        # True: observers run before the reply, inside the request's span (service/tracing.py)
        self.observe_in_request = False

    async def handle(
        self,
        protocol: str,
        model: str,
        version: str | None,
        raw_headers: Iterable[tuple[bytes, bytes]],
        receive: Receive,
    ) -> Reply:
        """Answer one inference request; every outcome, good or bad, is a `Reply`."""
        started = perf_counter()
        headers = dict(raw_headers)
        request_id = headers.get(REQUEST_ID, b"").decode("latin-1") or None
        if request_id is not None and not protocol_v2.valid_request_id(request_id):
            request_id = None
        variant: Variant | None = None
        json_length: int | None = None
        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        try:
            self.state.check_version(model, version)
            router = self.state.router(model)
            variant = (
                router.get(version) if version else router.pick(headers.get(router.sticky_header))
            )
            body = await read_body(receive, self.limit, headers.get(b"content-length"))
            if protocol == "v2":
                request = protocol_v2.decode_request(
                    body,
                    protocol_v2.parse_header_length(
                        headers.get(b"inference-header-content-length"), len(body)
                    ),
                    variant.signature,
                )
                request_id = request.id or request_id or self.new_request_id()
                inputs = request.inputs
                outputs = variant.session.run(request.inputs)
                payload, json_length = protocol_v2.encode_response(
                    model_name=model,
                    model_version=variant.version,
                    request_id=request_id,
                    outputs=outputs,
                    requested=request.outputs,
                )
            else:
                inputs = protocol_v1.decode_request(body, variant.signature)
                outputs = variant.session.run(inputs)
                payload = protocol_v1.encode_response(outputs, variant.signature)
            status = 200
        except KdgateError as exc:
            status, payload = exc.status_code, error_body(exc.message)
        except ClientDisconnected:
            raise
        except Exception:
            # A bug or a runtime failure, never the caller's input (that is InvalidInput).
            log.exception("inference failed: model=%s version=%s", model, version)
            status, payload = 500, error_body("internal error while running the model")
        request_id = request_id or self.new_request_id()
        observation: Callable[[], None] | None = None
        if status == 200 and variant is not None and (observe := self.observers.get(model)):
            observation = partial(observe, request_id, variant.version, inputs, outputs)
            if self.observe_in_request:
                observation()
                observation = None
        reply_headers: RawHeaders = [
            (b"content-type", JSON if json_length is None else OCTET_STREAM),
            (b"content-length", str(len(payload)).encode()),
            variant.version_header if variant else (MODEL_VERSION, NO_VERSION),
            (REQUEST_ID, request_id.encode()),
        ]
        if json_length is not None:
            reply_headers.append((b"inference-header-content-length", str(json_length).encode()))
        after = partial(self.record, protocol, model, variant, status, started, inputs, observation)
        return Reply(status, reply_headers, payload, after)

    def record(
        self,
        protocol: str,
        model: str,
        variant: Variant | None,
        status: int,
        started: float,
        inputs: dict[str, Any],
        observation: Callable[[], None] | None = None,
    ) -> None:
        """A request's bookkeeping once answered: metrics, drift tap (`started`: perf_counter),
        and `observation` (the model's shadow and feedback hook, bound to this request) when it
        did not run in the request."""
        if variant is None:
            self.state.unrouted(model if model in self.state.versions else "").inc(protocol, status)
            return
        if observation is not None:
            observation()
        if status == 200 and (tap := self.input_taps.get(model)):
            tap(inputs)
        variant.requests.inc(protocol, status)
        variant.duration.observe(perf_counter() - started)
