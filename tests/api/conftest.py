"""In-process app fixtures: a tiny student on disk, settings for it, a fresh registry per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.settings import load_settings
from tests.support.asgi import running
from tests.support.tiny_model import write_config


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path, max_body_bytes=64 * 1024)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(params=[True, False], ids=["fast-path", "fastapi-route"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def client(
    config_file: Path, registry: CollectorRegistry, fast_path: bool
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(config_file), registry=registry, fast_path=fast_path)
    async with running(app) as client:
        yield client
