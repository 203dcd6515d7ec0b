"""Drive a kdgate app in process: its lifespan and an httpx client on an ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from functools import partial
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from kdgate.service.app import KdgateApp


@asynccontextmanager
async def running(app: KdgateApp, *, lifespan: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on `app`, with the lifespan run around it (models loaded and warm)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://kdgate.test") as client:
        if not lifespan:
            yield client
            return
        async with app.router.lifespan_context(app):
            yield client


class SyncClient:
    """A blocking client on an app in process (lifespan run), for hypothesis' sync tests.

    Starlette's TestClient is deprecated with httpx; this runs `running(app)` in an anyio
    blocking portal (an event loop in a thread) and forwards requests to it.
    """

    def __init__(self, app: KdgateApp) -> None:
        self._app = app
        self._stack = ExitStack()
        self._client: httpx.AsyncClient | None = None
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> SyncClient:
        self._portal = self._stack.enter_context(start_blocking_portal())
        self._client = self._stack.enter_context(
            self._portal.wrap_async_context_manager(running(self._app))
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        assert self._portal is not None and self._client is not None
        return self._portal.call(partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)
