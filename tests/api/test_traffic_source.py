"""The traffic file as the one source of traffic, in process: followed within seconds, written
by the admin API, refused loudly when invalid, 409 when read-only, and its precedence over an
edited config at restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.settings import Settings, load_settings
from tests.support.asgi import running
from tests.support.traffic import (
    AUTH,
    extra_student,
    infer_body,
    with_traffic_file,
    write_admin_config,
    write_traffic_file,
)

pytestmark = pytest.mark.anyio

TRAFFIC = "/admin/models/digits/traffic"
VERSIONS = "/admin/models/digits/versions"
INFER = "/v2/models/digits/infer"
CONVERGE_SECONDS = 5.0


async def eventually(
    check: Callable[[], Awaitable[bool]], seconds: float = CONVERGE_SECONDS
) -> float:
    """Seconds until `check()` holds; fails after `seconds`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def versions_served(client: httpx.AsyncClient, n: int = 40) -> set[str]:
    replies = await asyncio.gather(*(client.post(INFER, json=infer_body()) for _ in range(n)))
    assert all(r.status_code == 200 for r in replies), replies[0].text
    return {r.headers["x-kdgate-model-version"] for r in replies}


def errors(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("kdgate_traffic_source_errors_total", {"reason": reason})


def config_with_file(tmp_path: Path, **options: object) -> tuple[Settings, Path]:
    traffic_file = tmp_path / "shared" / "traffic.yaml"
    traffic_file.parent.mkdir()
    config = with_traffic_file(
        write_admin_config(tmp_path, {"1": 100, "2": 0}), traffic_file, **options
    )
    return load_settings(config), traffic_file


def cards_of(settings: Settings) -> dict[str, Path]:
    return {s.version: s.card for s in settings.models[0].students}


async def test_an_admin_change_reaches_every_app_on_the_same_file(tmp_path: Path) -> None:
    settings, traffic_file = config_with_file(tmp_path)
    async with running(create_app(settings)) as one, running(create_app(settings)) as two:
        assert await versions_served(two) == {"1"}
        put = await one.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 0, "2": 100}})
        assert put.status_code == 200, put.text
        assert await versions_served(one) == {"2"}  # the app that answered: at once
        seconds = await eventually(lambda: _serves(two, {"2"}))
        assert seconds < CONVERGE_SECONDS
        written = yaml.safe_load(traffic_file.read_text())["models"]["digits"]
        assert written["weights"] == {"1": 0, "2": 100}
        assert written["previous_weights"] == {"1": 100, "2": 0}
        # A version loaded through one app is loaded by the other too, then rolled back by it.
        card = extra_student(tmp_path, "3", seed=3)
        assert (await one.post(VERSIONS, headers=AUTH, json={"card": str(card)})).status_code == 201

        async def has_three() -> bool:
            reply = await two.post("/v2/models/digits/versions/3/infer", json=infer_body())
            return reply.status_code == 200

        await eventually(has_three)
        rolled = await two.post(TRAFFIC + "/rollback", headers=AUTH)
        assert rolled.json()["weights"] == {"1": 100, "2": 0, "3": 0}
        await eventually(lambda: _serves(one, {"1"}))


async def _serves(client: httpx.AsyncClient, versions: set[str]) -> bool:
    return await versions_served(client) == versions


async def test_a_change_over_one_not_yet_followed_is_409_not_a_lost_update(
    tmp_path: Path,
) -> None:
    settings, traffic_file = config_with_file(tmp_path, poll_seconds=5.0)
    async with running(create_app(settings)) as one, running(create_app(settings)) as two:
        await asyncio.sleep(0.2)  # both have taken their first look at the file
        first = await one.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 50, "2": 50}})
        assert first.status_code == 200, first.text
        # `two` polls every 5 s: it has not applied the change yet, and must not write over it.
        second = await two.put(TRAFFIC, headers=AUTH, json={"shadow_fraction": 0.5})
        assert second.status_code == 409, second.text
        assert "has changed since this server last applied it" in second.json()["error"]
        on_file = yaml.safe_load(traffic_file.read_text())["models"]["digits"]
        assert on_file["weights"] == {"1": 50, "2": 50} and on_file["shadow_fraction"] == 0.1

        async def followed() -> bool:
            return (await two.get(TRAFFIC, headers=AUTH)).json()["weights"] == {"1": 50, "2": 50}

        await eventually(followed, seconds=10)
        again = await two.put(TRAFFIC, headers=AUTH, json={"shadow_fraction": 0.5})
        assert again.json() == {
            **again.json(),
            "weights": {"1": 50, "2": 50},
            "shadow_fraction": 0.5,
        }


async def test_an_edit_is_followed_and_an_invalid_one_refused_loudly(
    tmp_path: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    settings, traffic_file = config_with_file(tmp_path, poll_seconds=0.2)
    cards = cards_of(settings)
    async with running(create_app(settings, registry=registry)) as client:
        write_traffic_file(traffic_file, {"1": 30, "2": 70}, cards, shadow_fraction=0.5)

        async def split_is(weights: dict[str, int]) -> bool:
            return (await client.get(TRAFFIC, headers=AUTH)).json()["weights"] == weights

        await eventually(lambda: split_is({"1": 30, "2": 70}))
        assert (await client.get(TRAFFIC, headers=AUTH)).json()["shadow_fraction"] == 0.5
        assert errors(registry, "invalid") == 0

        caplog.set_level(logging.ERROR, logger="kdgate.service.traffic")
        write_traffic_file(traffic_file, {"1": 30, "2": 60}, cards)  # sums to 90
        await eventually(lambda: _counted(registry, "invalid"))
        assert "must sum to 100" in caplog.text and str(traffic_file) in caplog.text
        assert "last good split keeps serving" in caplog.text
        await asyncio.sleep(0.5)  # several polls: still the last good split, counted once
        assert await split_is({"1": 30, "2": 70}) and errors(registry, "invalid") == 1

        # A share for a version whose card does not exist: refused, not half applied.
        missing = {**cards, "4": tmp_path / "nowhere" / "student-v4.card.json"}
        write_traffic_file(traffic_file, {"1": 50, "2": 0, "4": 50}, missing)
        await eventually(lambda: _counted(registry, "refused"))
        assert "version '4' takes 50% of it but cannot be loaded" in caplog.text
        assert await split_is({"1": 30, "2": 70})

        write_traffic_file(traffic_file, {"1": 100, "2": 0}, cards)
        await eventually(lambda: _serves(client, {"1"}))


async def _counted(registry: CollectorRegistry, reason: str) -> bool:
    return (errors(registry, reason) or 0) >= 1


async def test_a_read_only_source_answers_409_saying_how_to_change_it(tmp_path: Path) -> None:
    # Tests run as root, which writes through a chmod: `traffic.read_only` is the switch here
    # (a read-only mount is detected with os.access, or refused with EROFS at the write).
    settings, traffic_file = config_with_file(tmp_path, read_only=True)
    write_traffic_file(traffic_file, {"1": 100, "2": 0}, cards_of(settings))
    before = traffic_file.read_bytes()
    card = extra_student(tmp_path, "3", seed=3)
    async with running(create_app(settings)) as client:
        for method, url, body in (
            ("PUT", TRAFFIC, {"weights": {"2": 100}}),
            ("POST", TRAFFIC + "/promote", {"version": "2"}),
            ("POST", TRAFFIC + "/rollback", None),
            ("POST", VERSIONS, {"card": str(card)}),
            ("DELETE", VERSIONS + "/2", None),
        ):
            response = await client.request(method, url, headers=AUTH, json=body)
            assert response.status_code == 409, (url, response.text)
            error = response.json()["error"]
            assert str(traffic_file) in error and "ConfigMap" in error and "kubectl" in error
        assert (await client.get(TRAFFIC, headers=AUTH)).json()["weights"] == {"1": 100, "2": 0}
        assert await versions_served(client) == {"1"}
    assert traffic_file.read_bytes() == before


async def test_a_weight_0_version_without_its_card_is_not_loaded_not_a_failed_start(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    settings, traffic_file = config_with_file(tmp_path)
    gone = tmp_path / "deleted" / "student-v9.card.json"
    write_traffic_file(traffic_file, {"1": 100, "2": 0, "9": 0}, {**cards_of(settings), "9": gone})
    async with running(create_app(settings, registry=registry)) as client:
        listed = (await client.get(VERSIONS, headers=AUTH)).json()["versions"]
        assert [(v["version"], v["loaded"]) for v in listed] == [
            ("1", True),
            ("2", True),
            ("9", False),
        ]
        assert "No such file" in listed[2]["error"] and str(gone) in listed[2]["card"]
        labels = {"model": "digits", "version": "9"}
        assert registry.get_sample_value("kdgate_traffic_version_not_loaded", labels) == 1
        explicit = await client.post("/v2/models/digits/versions/9/infer", json=infer_body())
        assert explicit.status_code == 404
        assert await versions_served(client) == {"1"}
        # Removing it from the source is allowed, and clears the series.
        removed = await client.delete(VERSIONS + "/9", headers=AUTH)
        assert removed.status_code == 200, removed.text
        assert registry.get_sample_value("kdgate_traffic_version_not_loaded", labels) is None


async def test_a_version_with_a_share_and_no_card_still_refuses_the_start(tmp_path: Path) -> None:
    settings, traffic_file = config_with_file(tmp_path)
    gone = tmp_path / "deleted" / "student-v9.card.json"
    write_traffic_file(traffic_file, {"1": 90, "9": 10}, {"1": cards_of(settings)["1"], "9": gone})
    with pytest.raises(FileNotFoundError, match=r"student-v9\.card\.json") as refused:
        async with running(create_app(settings)):
            pass
    (note,) = refused.value.__notes__
    assert "version '9' takes 10% of the traffic but cannot be loaded" in note


async def test_restart_with_an_edited_config_after_admin_changes_follows_the_traffic_file(
    tmp_path: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """The default traffic file (`<admin.state_dir>/traffic.json`) wins over the config for the
    models it names; the disagreement is a WARNING naming both and a gauge, never silent."""
    config = write_admin_config(tmp_path, {"1": 90, "2": 10})
    async with running(create_app(load_settings(config))) as first:
        put = await first.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 0, "2": 100}})
        assert put.status_code == 200, put.text
    # The operator edits the config: a version 3, and shadow 0.2.
    v3 = extra_student(tmp_path, "3", seed=3)
    data = yaml.safe_load(config.read_text())
    data["models"][0]["students"].append({"version": "3", "card": str(v3)})
    data["models"][0]["traffic"]["shadow_fraction"] = 0.2
    config.write_text(yaml.safe_dump(data))
    settings = load_settings(config)

    caplog.set_level(logging.WARNING, logger="kdgate.service.traffic")
    async with running(create_app(settings, registry=registry)) as second:
        (warning,) = [
            r.getMessage() for r in caplog.records if "differs from the config" in r.getMessage()
        ]
        assert str(settings.traffic_file) in warning and "models[].traffic" in warning
        assert "students: config ['1', '2', '3'], file ['1', '2']" in warning
        assert "shadow_fraction: config 0.2, file 0.1" in warning
        assert registry.get_sample_value("kdgate_traffic_source_differs", {"model": "digits"}) == 1
        traffic = (await second.get(TRAFFIC, headers=AUTH)).json()
        assert traffic["weights"] == {"1": 0, "2": 100} and traffic["shadow_fraction"] == 0.1
        three = await second.post("/v2/models/digits/versions/3/infer", json=infer_body())
        assert three.status_code == 404  # the file, which wins, has no version 3

    # Per the precedence, version 3 serves once the traffic file has it: here by deleting the
    # model's entry (the file) so the config is the source again.
    settings.traffic_file.unlink()
    caplog.clear()
    async with running(create_app(settings, registry=CollectorRegistry())) as third:
        assert not [r for r in caplog.records if "differs from the config" in r.getMessage()]
        three = await third.post("/v2/models/digits/versions/3/infer", json=infer_body())
        assert three.status_code == 200 and three.headers["x-kdgate-model-version"] == "3"
        traffic = (await third.get(TRAFFIC, headers=AUTH)).json()
        assert traffic["shadow_fraction"] == 0.2
