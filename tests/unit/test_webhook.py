"""Standard Webhooks signing and the notifier (monitoring/webhook.py), with a real receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import standardwebhooks
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.webhook import (
    EVENT_TYPE,
    Notifier,
    WebhookConfig,
    backoff_seconds,
    retrain_payload,
    sign,
    signed_headers,
    signing_key,
    verify,
)

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"kdgate-test-key-0123456789abcdef").decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The vector published with the Standard Webhooks reference libraries.
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_key_is_the_base64_after_the_prefix() -> None:
    key = bytes(range(256))[-32:]
    expected = hmac.new(key, b"msg_1.10.{}", hashlib.sha256).digest()
    secret = "whsec_" + base64.b64encode(key).decode()
    assert sign(secret, "msg_1", 10, b"{}") == "v1," + base64.b64encode(expected).decode()
    assert signing_key(secret.rstrip("=")) == key  # padding is optional, as in the libraries


def _library_verifies(secret: str, msg_id: str, body: bytes) -> bool:
    headers = signed_headers(secret, msg_id, body, int(time.time()))
    try:
        standardwebhooks.Webhook(secret).verify(body, headers, json_parse=False)
    except standardwebhooks.WebhookVerificationError:
        return False
    return True


@pytest.mark.parametrize("size", [24, 32, 33, 64])
@pytest.mark.parametrize("padded", [True, False])
def test_the_official_library_verifies_every_accepted_secret_form(size: int, padded: bool) -> None:
    rng = random.Random(size)
    for _ in range(20):
        encoded = base64.b64encode(rng.randbytes(size)).decode()
        secret = "whsec_" + (encoded if padded else encoded.rstrip("="))
        WebhookConfig(url="http://127.0.0.1:1/", secret=secret)  # accepted
        body = json.dumps({"n": rng.random(), "text": "\u00e9\u4e2d"}, ensure_ascii=False).encode()
        assert _library_verifies(secret, f"msg_{rng.getrandbits(64):x}", body)
        # ... and kdgate's verify accepts what the library signs with the same string.
        now = 1_700_000_000
        library = standardwebhooks.Webhook(secret).sign(
            "msg_1", datetime.fromtimestamp(now, UTC), body
        )
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now)}
        assert verify(secret, {**headers, "webhook-signature": library}, body, now=now)


@pytest.mark.parametrize(
    "secret",
    [
        "0f" * 32,  # openssl rand -hex 32, the form the deploy files used to suggest
        "a-real-secret-for-the-test",
        base64.b64encode(bytes(32)).decode(),  # base64 without the prefix
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # not standard base64
        "whsec_" + base64.b64encode(b"sixteen byte key").decode(),  # too short
    ],
)
def test_a_secret_the_standard_cannot_express_is_refused_with_how_to_make_one(secret: str) -> None:
    with pytest.raises(ValidationError, match=r"openssl rand -base64 32"):
        WebhookConfig(url="http://127.0.0.1:1/", secret=secret)


def test_verify() -> None:
    body, now = b'{"a":1}', 1_700_000_000
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": "v1,bogus " + sign(SECRET, "msg_1", now, body),
    }
    assert verify(SECRET, headers, body, now=now)
    assert not verify(SECRET, headers, body + b" ", now=now)
    assert not verify("whsec_" + base64.b64encode(b"o" * 32).decode(), headers, body, now=now)
    assert not verify(SECRET, headers, body, now=now + 301)  # replayed too late
    assert not verify(SECRET, {**headers, "webhook-id": "msg_2"}, body, now=now)
    assert not verify(SECRET, {"webhook-id": "msg_1"}, body, now=now)


@pytest.mark.parametrize("secret", ["changeme", "<your secret>", "", "whsec_not base64!"])
def test_placeholder_or_malformed_secret_is_rejected(secret: str) -> None:
    with pytest.raises(ValidationError):
        WebhookConfig(url="http://127.0.0.1:1/", secret=secret)


def test_config_repr_hides_the_secret() -> None:
    config = WebhookConfig(url="http://127.0.0.1:1/", secret=SECRET)
    assert SECRET not in repr(config) and SECRET not in str(config)


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(0)
    for attempts in range(12):
        ceiling = min(60.0, 0.5 * 2**attempts)
        values = [backoff_seconds(attempts, 0.5, 60.0, rng) for _ in range(200)]
        assert all(0 <= v <= ceiling for v in values)
        assert max(values) > 0.8 * ceiling  # spread over the whole range, not a fixed delay
    assert backoff_seconds(10_000, 1, 300, rng) <= 300


def test_payload_shape() -> None:
    breach = {
        "slo": "kl_mean",
        "observed": 0.2,
        "objective": 0.05,
        "window_seconds": 300,
        "samples": 500,
    }
    payload = retrain_payload(
        "digits",
        [breach],
        student_version="1",
        teacher_version="1",
        links={"slo": "/v1/slo"},
        now=0,
    )
    assert payload == {
        "type": EVENT_TYPE,
        "timestamp": "1970-01-01T00:00:00Z",
        "data": {
            "model": "digits",
            "student_version": "1",
            "teacher_version": "1",
            "breaches": [breach],
            "links": {"slo": "/v1/slo"},
        },
    }


class Receiver:
    """A real HTTP receiver on 127.0.0.1 that answers with the next scripted status."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.received = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                receiver.received.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def notifier_for(
    outbox: Outbox, client: httpx.AsyncClient, url: str, metrics: Metrics, clock: Clock
) -> Notifier:
    config = WebhookConfig(
        url=url,
        secret=SECRET,
        backoff_base_seconds=1,
        backoff_cap_seconds=10,
        max_age_seconds=3600,
    )
    return Notifier(outbox, client, config, metrics, clock=clock, rng=random.Random(1))


def delivered(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "kdgate_retrain_requests_total", {"model": "digits", "outcome": outcome}
    )
    return value or 0.0


async def test_500_then_200_is_retried_then_delivered_with_the_same_id(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.statuses = [500]
    clock, metrics = Clock(), Metrics(CollectorRegistry())
    outbox = Outbox(tmp_path / "outbox.sqlite3", clock=clock)
    payload = retrain_payload("digits", [], student_version="1", teacher_version="1")
    entry_id = outbox.enqueue(payload, dedup_key="k", model="digits")
    async with httpx.AsyncClient() as client:
        notifier = notifier_for(outbox, client, receiver.url, metrics, clock)
        assert await notifier.deliver_due() == 1
        assert delivered(metrics, "retried") == 1
        assert await notifier.deliver_due() == 0  # backing off
        clock.now += 10
        assert await notifier.deliver_due() == 1
    assert delivered(metrics, "delivered") == 1
    assert [h["webhook-id"] for h, _ in receiver.requests] == [entry_id, entry_id]
    for headers, body in receiver.requests:
        assert verify(SECRET, headers, body, now=clock.now)
        assert json.loads(body) == payload
    assert outbox.get(entry_id).status == "delivered"  # type: ignore[union-attr]
    assert "HTTP 500" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET.removeprefix("whsec_") not in caplog.text


async def test_restarted_notifier_delivers_the_pending_entry_with_the_same_id(
    tmp_path: Path, receiver: Receiver
) -> None:
    clock, metrics = Clock(), Metrics(CollectorRegistry())
    path = tmp_path / "outbox.sqlite3"
    entry_id = Outbox(path, clock=clock).enqueue({"n": 1}, dedup_key="k", model="digits")
    down = Receiver([])
    down_url = down.url
    down.close()  # nothing listens there any more: connection refused
    async with httpx.AsyncClient() as client:
        await notifier_for(
            Outbox(path, clock=clock), client, down_url, metrics, clock
        ).deliver_due()
    assert delivered(metrics, "retried") == 1
    clock.now += 60
    # A new process: new Outbox object, new client, new notifier, same file.
    async with httpx.AsyncClient() as client:
        fresh = notifier_for(Outbox(path, clock=clock), client, receiver.url, metrics, clock)
        assert await fresh.deliver_due() == 1
    assert [h["webhook-id"] for h, _ in receiver.requests] == [entry_id]
    assert verify(SECRET, *receiver.requests[0], now=clock.now)


async def test_entry_older_than_max_age_is_failed_and_counted(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses = [503] * 100
    clock, metrics = Clock(), Metrics(CollectorRegistry())
    outbox = Outbox(tmp_path / "outbox.sqlite3", clock=clock)
    entry_id = outbox.enqueue({}, dedup_key="k", model="digits")
    async with httpx.AsyncClient() as client:
        notifier = notifier_for(outbox, client, receiver.url, metrics, clock)
        await notifier.deliver_due()
        clock.now += 3600
        await notifier.deliver_due()
        clock.now += 10_000
        assert await notifier.deliver_due() == 0
    assert outbox.get(entry_id).status == "failed"  # type: ignore[union-attr]
    assert delivered(metrics, "failed") == 1
    assert delivered(metrics, "retried") == 1
    assert len(receiver.requests) == 2


async def test_run_loop_delivers_after_wake_and_stops_on_cancel(
    tmp_path: Path, receiver: Receiver
) -> None:
    import asyncio

    metrics = Metrics(CollectorRegistry())
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    config = WebhookConfig(url=receiver.url, secret=SECRET, poll_seconds=60)
    async with httpx.AsyncClient() as client:
        notifier = Notifier(outbox, client, config, metrics)
        task = asyncio.create_task(notifier.run())
        await asyncio.sleep(0.05)  # the first (empty) round, then waiting for a wake-up
        await asyncio.to_thread(outbox.enqueue, {}, dedup_key="k", model="digits")
        notifier.wake()
        assert await asyncio.to_thread(receiver.received.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(receiver.requests) == 1


async def test_run_loop_survives_an_unusable_outbox_with_bounded_backoff(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    metrics = Metrics(CollectorRegistry())
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
    config = WebhookConfig(url=receiver.url, secret=SECRET, poll_seconds=0.01)
    shutil.rmtree(outbox.path.parent)
    outbox.path.parent.write_text("a file where the outbox directory was")
    async with httpx.AsyncClient() as client:
        task = asyncio.create_task(Notifier(outbox, client, config, metrics).run())
        await asyncio.sleep(1.5)
        assert not task.done()
        failures = [r for r in caplog.records if "delivery round failed" in r.getMessage()]
        # Doubling from 10 ms: about 7 rounds in 1.5 s, not 150; one traceback, then one line.
        assert 3 <= len(failures) <= 10
        assert [bool(r.exc_info) for r in failures].count(True) == 1
        outbox.path.parent.unlink()  # repaired: the next round recreates the outbox
        await asyncio.to_thread(outbox.enqueue, {}, dedup_key="k", model="digits")
        assert await asyncio.to_thread(receiver.received.wait, 5)
        deadline = time.monotonic() + 5
        while "works again" not in caplog.text:
            assert time.monotonic() < deadline, "the recovery was not logged"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(receiver.requests) == 1
