"""The retrain webhook: Standard Webhooks signing, the payload, and the notifier that delivers it.

Signing (https://www.standardwebhooks.com): three headers on every POST

    webhook-id:        the outbox entry id, identical on every retry (the idempotency key)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>

The secret is the Standard Webhooks form `whsec_<base64>`; the key is the base64-decoded bytes
after the prefix, exactly what the official libraries derive from the same string, so a receiver
built on them verifies kdgate's deliveries. Any other form is refused at startup: a bare string
would be read as UTF-8 bytes by some receivers and as base64 by the official ones, and the
signatures would silently disagree. Make one with `echo "whsec_$(openssl rand -base64 32)"`.

Delivery::

    notifier = Notifier(outbox, httpx.AsyncClient(), config, metrics)
    task = asyncio.create_task(notifier.run())      # lifespan start; task.cancel() at stop
    await asyncio.to_thread(outbox.enqueue_breach, ...); notifier.wake()

An open incident (`Outbox.enqueue_breach` with a grouping window) is not due until its window
closes: the notifier's next poll after that claims, seals and sends it.

The same outbox and notifier deliver the rollout events (`rollout_payload`: `rollout.started`,
`rollout.step_passed`, `rollout.promoted`, `rollout.rolled_back`), signed alike; only retrain
requests count in `kdgate_retrain_requests_total`.

2xx marks the entry delivered (`kdgate_retrain_requests_total{outcome="delivered"}`); anything
else, or no answer, schedules a retry with exponential backoff and full jitter (`retried`); an
entry older than `max_age_seconds` that fails again is marked failed (`failed`). State lives in
the outbox, so a fresh notifier on the same file resumes with the same webhook-ids.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import Outbox, OutboxEntry

log = logging.getLogger(__name__)

EVENT_TYPE = "kdgate.retrain.requested"
ROLLOUT_EVENTS = (
    "rollout.started",
    "rollout.step_passed",
    "rollout.promoted",
    "rollout.rolled_back",
)
SIGNATURE_VERSION = "v1"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks prefix, not a secret
_PLACEHOLDER_SECRETS = {
    "", "changeme", "change-me", "change_me", "secret", "password", "placeholder", "xxx", "todo",
}  # fmt: skip
# Longest wait between notifier rounds while they keep failing (the outbox is unusable).
ERROR_BACKOFF_CAP_SECONDS = 30.0
# Standard Webhooks keys are 24 to 64 random bytes; shorter keys are refused at startup.
MIN_KEY_BYTES = 24
_HOW_TO_MAKE = 'make one with: echo "whsec_$(openssl rand -base64 32)"'


class WebhookConfig(BaseModel):
    """The `webhook:` section. Delivery is off while `url` is None.

    `secret` is a `SecretStr`: its repr and str are masked, so logging the config is safe.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    secret: SecretStr | None = None
    outbox_path: Path = Field(
        default=Path("state/outbox.sqlite3"), description="SQLite outbox; relative to the cwd"
    )
    cooldown_seconds: float = Field(default=3600, ge=0, description="per model and SLO")
    # Alertmanager's group_wait: one incident's breaches arrive over tens of seconds (the
    # fidelity SLOs at one evaluation, drift share at the drift job's next run, every 60 s by
    # default), and one request carrying them all is worth a minute's delay to a retrain.
    group_wait_seconds: float = Field(
        default=60, ge=0, description="breaches of one model within it: one request"
    )
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    max_age_seconds: float = Field(default=86400.0, gt=0, description="then marked failed")
    timeout_seconds: float = Field(default=10.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0, description="outbox poll interval")
    # What a 2xx from POST /v1/hooks/alertmanager promises (docs/fleet.md). "durable": the
    # request is in this replica's outbox (202), which outlives the process but not the disk.
    # "delivered": the retrain receiver answered 2xx (200); else 503 within
    # `hook_deadline_seconds`, so Alertmanager's own retries carry the alert (through the load
    # balancer, to any replica) under the same webhook-id: nothing rests on one pod's disk.
    hook_ack: Literal["durable", "delivered"] = "durable"
    # Below Alertmanager's notify timeout (at least 10 s per flush) so it still gets our 503.
    hook_deadline_seconds: float = Field(default=5.0, gt=0, description="delivered: then 503")

    @field_validator("secret")
    @classmethod
    def _not_a_placeholder(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        if value.strip().lower() in _PLACEHOLDER_SECRETS or value.startswith("<"):
            raise ValueError("webhook secret is a placeholder; set a real one or leave it unset")
        signing_key(value)  # a malformed secret fails at startup, not at first delivery
        return secret

    @model_validator(mode="after")
    def _signed(self) -> Self:
        if self.url is not None and self.secret is None:
            raise ValueError("webhook.url is set but webhook.secret is not: deliveries are signed")
        if self.hook_ack == "delivered" and self.url is None:
            raise ValueError("webhook.hook_ack is delivered but webhook.url is not set")
        return self


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret: the decoded bytes after the prefix.

    Raises ValueError, with how to make a good secret, for any other form or a key shorter than
    `MIN_KEY_BYTES`. Padding is optional, as in the official libraries (they add it back).
    """
    encoded = secret.removeprefix(SECRET_PREFIX)
    if encoded == secret:
        raise ValueError(
            f"webhook secret must be the Standard Webhooks form whsec_<base64>; {_HOW_TO_MAKE}"
        )
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(
            f"webhook secret must be standard base64 after whsec_; {_HOW_TO_MAKE}"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"webhook secret decodes to {len(key)} bytes, need at least {MIN_KEY_BYTES}; "
            + _HOW_TO_MAKE
        )
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The three Standard Webhooks headers plus the JSON content type."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> bool:
    """True when one of the `webhook-signature` entries matches and the timestamp is recent.

    `headers` must be case-insensitive or lower-case. Signatures are compared in constant time;
    several space-separated `v1,<sig>` entries (key rotation) are accepted.
    """
    try:
        msg_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        received = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = sign(secret, msg_id, timestamp, body).encode()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in received)


def retrain_payload(
    model: str,
    breaches: Sequence[Mapping[str, Any]],
    *,
    student_version: str | None,
    teacher_version: str | None,
    links: Mapping[str, str] | None = None,
    capture: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The webhook body: `{"type", "timestamp" (RFC 3339 UTC), "data": {...}}` per DESIGN.md.

    `capture` (when the model's shadow capture is on) says where the retraining data is:
    `{"dir", "rows", "format"}` (`monitoring.capture.CaptureStore.describe`).
    """
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    data: dict[str, Any] = {
        "model": model,
        "student_version": student_version,
        "teacher_version": teacher_version,
        "breaches": [dict(b) for b in breaches],
        "links": dict(links or {}),
    }
    if capture is not None:
        data["capture"] = dict(capture)
    return {
        "type": EVENT_TYPE,
        "timestamp": moment.isoformat().replace("+00:00", "Z"),
        "data": data,
    }


def rollout_payload(
    event: str, data: Mapping[str, Any], *, now: float | None = None
) -> dict[str, Any]:
    """A rollout event body: `{"type": event, "timestamp", "data"}`, the retrain request's form.
    `data` holds model, candidate, incumbent, step, weight, state, checks and reason."""
    if event not in ROLLOUT_EVENTS:
        raise ValueError(f"unknown rollout event {event!r}; one of {ROLLOUT_EVENTS}")
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return {
        "type": event,
        "timestamp": moment.isoformat().replace("+00:00", "Z"),
        "data": dict(data),
    }


def backoff_seconds(
    attempts: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempts)] seconds."""
    ceiling = min(cap, base * 2 ** min(attempts, 62))
    return (rng or random).uniform(0, ceiling)


class Notifier:
    """Delivers due outbox entries to `config.url`, signed with `config.secret`.

    `client` is injected (its base settings are the caller's; the timeout comes from `config`).
    `clock` returns unix seconds and `rng` drives the jitter, both for tests.
    """

    def __init__(
        self,
        outbox: Outbox,
        client: httpx.AsyncClient,
        config: WebhookConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if config.url is None or config.secret is None:
            raise ValueError("the notifier needs webhook.url and webhook.secret")
        self._outbox = outbox
        self._client = client
        self._config = config
        self._url = config.url
        self._secret = config.secret
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Deliver now instead of at the next poll (call after an enqueue, on the loop)."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver due entries forever, polling every `poll_seconds`; stop by cancelling.

        A round that fails (the outbox cannot be read, ...) is logged and the task goes on,
        waiting longer after each failure in a row (doubling from `poll_seconds`, at most
        `ERROR_BACKOFF_CAP_SECONDS`) so a lasting fault is one line per try, not a traceback
        every poll; `wake()` still starts a round at once. Entries are never lost by a failed
        round: they stay in the outbox and are claimed again.
        """
        failures = 0
        while True:
            self._wake.clear()  # before the round: a wake() during the round is not lost
            try:
                await self.deliver_due()
            except Exception as exc:
                failures += 1
                wait = min(ERROR_BACKOFF_CAP_SECONDS, self._config.poll_seconds * 2**failures)
                log.error(
                    "webhook delivery round failed (%d in a row): %s: %s; next try in %.2f s",
                    failures,
                    type(exc).__name__,
                    exc,
                    wait,
                    exc_info=failures == 1,  # the traceback once per incident
                )
            else:
                if failures:
                    log.warning("webhook delivery works again after %d failed rounds", failures)
                failures = 0
                wait = self._config.poll_seconds
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # arrives as the event is set (a wake() during stop), and the task never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def deliver_due(self) -> int:
        """One round: claim due entries (in a thread) and POST each. Returns how many were tried."""
        entries = await asyncio.to_thread(self._outbox.claim_due)
        for entry in entries:
            await self._deliver(entry)
        return len(entries)

    async def deliver_now(self, entry_ids: Sequence[str], deadline_seconds: float) -> set[str]:
        """POST the entries `entry_ids` at once (concurrently), for at most `deadline_seconds`.

        Returns the ids the receiver has taken (now or before). An entry not taken keeps its
        place in the outbox: a failed attempt schedules a retry; one cut by the deadline stays
        leased for `2 * deadline_seconds`, then the notifier claims it again.
        """
        ids = list(dict.fromkeys(entry_ids))
        lease = 2 * deadline_seconds
        entries = await asyncio.to_thread(self._outbox.claim, ids, lease_seconds=lease)
        taken = await asyncio.to_thread(self._delivered, set(ids) - {e.id for e in entries})
        results: list[bool] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_seconds):
                results = await asyncio.gather(*(self._deliver(entry) for entry in entries))
        return taken | {entry.id for entry, ok in zip(entries, results, strict=False) if ok}

    def _delivered(self, entry_ids: set[str]) -> set[str]:
        """Those of `entry_ids` the outbox holds as delivered (blocking)."""
        entries = (self._outbox.get(entry_id) for entry_id in entry_ids)
        return {e.id for e in entries if e is not None and e.status == "delivered"}

    async def _deliver(self, entry: OutboxEntry) -> bool:
        timestamp = int(self._clock())
        headers = signed_headers(self._secret.get_secret_value(), entry.id, entry.body, timestamp)
        try:
            response = await self._client.post(
                self._url, content=entry.body, headers=headers, timeout=self._config.timeout_seconds
            )
            error = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            await asyncio.to_thread(self._outbox.mark_delivered, entry.id)
            self._count(entry, "delivered")
            log.info("webhook %s delivered (%s, model %s)", entry.id, _kind(entry), entry.model)
            return True
        now = self._clock()
        if now - entry.created >= self._config.max_age_seconds:
            await asyncio.to_thread(self._outbox.mark_failed, entry.id, error)
            self._count(entry, "failed")
            log.error(
                "webhook %s (%s) failed after %d attempts: %s",
                entry.id,
                _kind(entry),
                entry.attempts + 1,
                error,
            )
            return False
        delay = backoff_seconds(
            entry.attempts,
            self._config.backoff_base_seconds,
            self._config.backoff_cap_seconds,
            self._rng,
        )
        await asyncio.to_thread(self._outbox.schedule_retry, entry.id, now + delay, error)
        self._count(entry, "retried")
        log.warning("webhook %s (%s): %s; retry in %.1f s", entry.id, _kind(entry), error, delay)
        return False

    def _count(self, entry: OutboxEntry, outcome: str) -> None:
        if _kind(entry) == EVENT_TYPE:
            self._metrics.retrain_requests.labels(model=entry.model, outcome=outcome).inc()


def _kind(entry: OutboxEntry) -> str:
    """The event type of an outbox entry (`type` of its body)."""
    try:
        kind = entry.payload.get("type")
    except ValueError:  # not JSON: nothing kdgate wrote; name it by what it is not
        return "unreadable"
    return kind if isinstance(kind, str) else EVENT_TYPE
