"""One real kdgate server per module, serving the tiny student from a temp config."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.live_server import LiveServer, live_server
from tests.support.tiny_model import write_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    config = write_config(tmp_path_factory.mktemp("live"), max_body_bytes=1024 * 1024)
    with live_server(config) as running:
        yield running
