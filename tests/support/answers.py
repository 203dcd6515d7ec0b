"""Client traffic in a background thread that records which version answered each request.

    with versions_answering(server.url, "/v2/models/digits/infer", body_for) as versions:
        ...                                   # versions: "x-kdgate-model-version" per answer

Every answer must be a 200: the block fails on exit with the first failures otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx


@contextmanager
def versions_answering(
    url: str,
    path: str,
    body_for: Callable[[int], dict[str, Any]],
    *,
    rate: float = 40,
    spread: bool = False,
) -> Iterator[list[str]]:
    """POST `body_for(n)` to `path` at about `rate` per second until the block ends. `spread`: a
    new connection per request, so that every worker gets some (one keep-alive connection
    stays with the worker that accepted it)."""
    versions: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def send() -> None:
        n = 0
        limits = httpx.Limits(max_keepalive_connections=0 if spread else None)
        with httpx.Client(base_url=url, timeout=10, limits=limits) as http:
            while not stop.is_set():
                r = http.post(path, json=body_for(n))
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                versions.append(r.headers.get("x-kdgate-model-version", "?"))
                n += 1
                stop.wait(1 / rate)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield versions
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not failures, failures[:3]
