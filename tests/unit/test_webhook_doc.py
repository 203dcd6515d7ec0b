"""The receiver in docs/webhook.md verifies what kdgate's notifier sends (so the doc cannot rot)."""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.webhook import Notifier, WebhookConfig, retrain_payload

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhook.md"
SECRET = "whsec_" + base64.b64encode(b"doc-test-secret-key-32-bytes-xx").decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def doc_receiver() -> Iterator[tuple[dict[str, Any], str]]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/webhook.md should hold exactly one python block"
    namespace: dict[str, Any] = {"__name__": "webhook_doc"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    namespace["SECRET"] = SECRET
    namespace["Handler"].log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), namespace["Handler"])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield namespace, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_doc_receiver_accepts_kdgate_and_rejects_forgeries(
    tmp_path: Path, doc_receiver: tuple[dict[str, Any], str]
) -> None:
    namespace, url = doc_receiver
    metrics = Metrics(CollectorRegistry())
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    payload = retrain_payload("digits", [], student_version="1", teacher_version="1")
    outbox.enqueue(payload, dedup_key="k", model="digits")
    async with httpx.AsyncClient() as client:
        notifier = Notifier(outbox, client, WebhookConfig(url=url, secret=SECRET), metrics)
        assert await notifier.deliver_due() == 1
        assert namespace["received"] == [payload]
        forged = await client.post(
            url,
            content=b'{"type":"kdgate.retrain.requested"}',
            headers={"webhook-id": "msg_x", "webhook-timestamp": "1", "webhook-signature": "v1,x"},
        )
        assert forged.status_code == 401
    delivered = metrics.registry.get_sample_value(
        "kdgate_retrain_requests_total", {"model": "digits", "outcome": "delivered"}
    )
    assert delivered == 1
