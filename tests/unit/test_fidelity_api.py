"""Parsing a feedback body a slice at a time gives what parsing it whole gives."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from kdgate.service import fidelity_api
from kdgate.service.errors import InvalidInput
from kdgate.service.fidelity_api import parse_feedback

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    # Slices of a few dozen bytes: every kind of cut shows up in a short body.
    monkeypatch.setattr(fidelity_api, "_SLICE_BYTES", 40)


def awkward_item(rng: random.Random) -> dict[str, Any]:
    """Ids and labels holding the cut mark `},` inside strings and nested objects."""
    label: Any = rng.choice(
        [rng.randrange(10), "}, {", [1, {"a": "},"}, 2], {"x": [{"y": 1}, {"z": "},]"}]}]
    )
    return {"id": rng.choice(["a", "},{", 'q"}, "', "x" * rng.randrange(60)]), "label": label}


async def test_sliced_parse_equals_whole_parse_on_awkward_bodies() -> None:
    rng = random.Random(5)
    for _ in range(300):
        items = [awkward_item(rng) for _ in range(rng.randrange(0, 12))]
        body = orjson.dumps(items, option=rng.choice([0, orjson.OPT_INDENT_2]))
        assert await parse_feedback(body) == items


@pytest.mark.parametrize(
    "body",
    [
        b'[{"id": "a", "label": 1}, {"id": "b", "label": 2}, 3, {"id": "c", "label": 1}]',
        b'[{"id": "a", "label": 1}, {"id": "b", "label": 2}, {"id": "c", "label": 1}',
        b'{"id": "a", "label": 1}, {"id": "b", "label": 2}, {"id": "c", "label": 1}]',
    ],
)
async def test_bad_bodies_are_refused_as_a_whole_would_be(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="JSON array"):
        await parse_feedback(body)
