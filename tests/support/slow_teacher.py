"""A stand-in remote teacher on 127.0.0.1: an OIP V2 infer endpoint that answers after a delay
(or with an error), served by uvicorn in a thread, counting the calls it gets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import uvicorn


@dataclass
class StubTeacher:
    delay_seconds: float = 0.2
    status: int = 200
    calls: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls += 1
        await asyncio.sleep(self.delay_seconds)
        rows = orjson.loads(body)["inputs"][0]["shape"][0]
        # Logits that favour class 0: any well-formed answer will do.
        logits = np.zeros((rows, 10), np.float32)
        logits[:, 0] = 1.0
        answer = {
            "outputs": [
                {
                    "name": "logits",
                    "shape": [rows, 10],
                    "datatype": "FP32",
                    "data": logits.reshape(-1).tolist(),
                }
            ]
        }
        payload = orjson.dumps(answer) if self.status == 200 else b'{"error": "stub"}'
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@contextmanager
def stub_teacher(delay_seconds: float = 0.2, status: int = 200) -> Iterator[StubTeacher]:
    """Serve a StubTeacher on a free loopback port until exit."""
    app = StubTeacher(delay_seconds=delay_seconds, status=status)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stub teacher did not start")
        time.sleep(0.01)
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def closed_port() -> Iterator[str]:
    """A loopback URL whose port is bound but not listening: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
