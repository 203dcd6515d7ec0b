"""The admin API in process: auth, the split under load, sticky keys, versions, saved state."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.app import create_app
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import ServerSettings, Settings, StudentSettings, load_settings
from kdgate.service.state import load_student
from tests.support.asgi import running
from tests.support.tiny_model import reference_logits
from tests.support.traffic import (
    AUTH,
    ROW,
    TOKEN,
    extra_student,
    infer_body,
    tampered_student,
    write_admin_config,
)

pytestmark = pytest.mark.anyio

TRAFFIC = "/admin/models/digits/traffic"
VERSIONS = "/admin/models/digits/versions"
INFER = "/v2/models/digits/infer"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = load_settings(write_admin_config(tmp_path, {"1": 90, "2": 10}))
    # Hundreds of requests at once check routing here, not load shedding (server.max_in_flight).
    server = settings.server.model_copy(update={"max_in_flight": 0})
    return settings.model_copy(update={"server": server})


@pytest.fixture
async def admin(
    settings: Settings, registry: CollectorRegistry
) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(settings, registry=registry)) as client:
        yield client


def served_version(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-kdgate-model-version"]


def weight(registry: CollectorRegistry, version: str) -> float | None:
    return registry.get_sample_value(
        "kdgate_traffic_weight", {"model": "digits", "version": version}
    )


async def test_admin_is_off_without_a_token(tmp_path: Path) -> None:
    app = create_app(load_settings(write_admin_config(tmp_path, token=None)))
    async with running(app) as client:
        response = await client.get(TRAFFIC, headers=AUTH)
    assert response.status_code == 404
    assert "admin API is off" in response.json()["error"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": TOKEN}, 401),  # no scheme
        ({"Authorization": "Basic " + TOKEN}, 401),
        ({"Authorization": "Bearer " + TOKEN[:-1]}, 403),
        ({"Authorization": "Bearer " + TOKEN + "x"}, 403),
    ],
)
async def test_missing_token_is_401_and_wrong_token_403(
    admin: httpx.AsyncClient, headers: dict[str, str], status: int
) -> None:
    for method, url, body in (
        ("GET", TRAFFIC, None),
        ("PUT", TRAFFIC, {"weights": {"1": 0, "2": 100}}),
        ("POST", VERSIONS, {"card": "/nonexistent"}),  # auth comes before body checks
        ("DELETE", VERSIONS + "/2", None),
    ):
        response = await admin.request(method, url, headers=headers, json=body)
        assert response.status_code == status, (method, url, response.text)
        assert "error" in response.json()
    assert (await admin.get(TRAFFIC, headers=AUTH)).json()["weights"] == {"1": 90, "2": 10}


async def test_ten_thousand_requests_follow_a_90_10_split(
    admin: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    body = infer_body()
    counts: Counter[str] = Counter()
    for _ in range(100):
        replies = await asyncio.gather(*(admin.post(INFER, json=body) for _ in range(100)))
        counts.update(served_version(r) for r in replies)
    assert sum(counts.values()) == 10_000
    # Binomial(10000, 0.1): sd 0.3 points, so +-1.5 points is 5 sd.
    assert abs(100 * counts["2"] / 10_000 - 10) <= 1.5, counts
    assert abs(100 * counts["1"] / 10_000 - 90) <= 1.5, counts
    assert (weight(registry, "1"), weight(registry, "2")) == (90, 10)
    served = registry.get_sample_value(
        "kdgate_requests_total",
        {"model": "digits", "version": "2", "protocol": "v2", "code": "200"},
    )
    assert served == counts["2"]


async def test_same_route_key_same_version_and_canary_growth_only_adds(
    admin: httpx.AsyncClient,
) -> None:
    body = infer_body()
    keys = [f"caller-{i}" for i in range(300)]

    async def assignment() -> dict[str, str]:
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            replies = await asyncio.gather(
                *(admin.post(INFER, json=body, headers={"x-kdgate-route-key": k}) for k in keys)
            )
            for key, reply in zip(keys, replies, strict=True):
                seen.setdefault(key, set()).add(served_version(reply))
        assert all(len(versions) == 1 for versions in seen.values()), seen
        return {key: versions.pop() for key, versions in seen.items()}

    at_10 = await assignment()
    assert set(at_10.values()) == {"1", "2"}
    response = await admin.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 70, "2": 30}})
    assert response.status_code == 200, response.text
    at_30 = await assignment()
    # Raising the canary's weight moves callers onto it, never off it.
    assert all(at_30[k] == "2" for k, v in at_10.items() if v == "2")
    assert sum(v == "2" for v in at_30.values()) > sum(v == "2" for v in at_10.values())


async def test_put_changes_only_the_given_fields_and_is_saved(
    admin: httpx.AsyncClient, settings: Settings, registry: CollectorRegistry
) -> None:
    response = await admin.put(TRAFFIC, headers=AUTH, json={"weights": {"2": 100}})
    assert response.status_code == 200, response.text
    expected = {
        "weights": {"1": 0, "2": 100},
        "sticky_header": "x-kdgate-route-key",
        "shadow_fraction": 0.1,
    }
    assert response.json() == expected
    assert (await admin.get(TRAFFIC, headers=AUTH)).json() == expected
    replies = await asyncio.gather(*(admin.post(INFER, json=infer_body()) for _ in range(50)))
    assert {served_version(r) for r in replies} == {"2"}
    assert (weight(registry, "1"), weight(registry, "2")) == (0, 100)

    response = await admin.put(TRAFFIC, headers=AUTH, json={"shadow_fraction": 0.25})
    assert response.json() == {**expected, "shadow_fraction": 0.25}
    state_dir = settings.admin.state_dir
    saved = json.loads((state_dir / "traffic.json").read_text())["models"]["digits"]
    split = {k: saved[k] for k in ("weights", "sticky_header", "shadow_fraction")}
    assert split == {**expected, "shadow_fraction": 0.25}
    assert [v["version"] for v in saved["versions"]] == ["1", "2"]
    assert saved["previous_weights"] == {"1": 90, "2": 10}
    assert [p.name for p in state_dir.iterdir()] == ["traffic.json"]  # no temp file left


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"weights": {"1": 50, "2": 40}}, "sum to 100"),
        ({"weights": {"1": 50, "7": 50}}, "versions ['7']"),
        ({"weights": {"1": 110, "2": -10}}, ">= 0"),
        ({"weights": {}}, "weights are empty"),
        ({"weights": {"1": 50.5, "2": 49.5}}, "integer"),
        ({"shadow_fraction": 1.5}, "less than or equal to 1"),
        ({"sticky_header": "bad header"}, "sticky_header"),
        ({"sticky_header": "Content-Length"}, "framing"),
        ({"sticky_header": "x" * 10_000}, "over 64 characters"),
        ({"weight": {"1": 100}}, "weight"),
    ],
)
async def test_invalid_changes_are_400_with_the_reason_and_change_nothing(
    admin: httpx.AsyncClient, change: dict[str, object], reason: str
) -> None:
    before = (await admin.get(TRAFFIC, headers=AUTH)).json()
    response = await admin.put(TRAFFIC, headers=AUTH, json=change)
    assert response.status_code == 400
    assert reason in response.json()["error"], response.json()
    assert (await admin.get(TRAFFIC, headers=AUTH)).json() == before


async def test_unknown_model_is_404(admin: httpx.AsyncClient) -> None:
    response = await admin.get("/admin/models/cats/traffic", headers=AUTH)
    assert response.status_code == 404 and "cats" in response.json()["error"]


async def test_load_a_version_then_promote_and_roll_back(
    admin: httpx.AsyncClient, tmp_path: Path, registry: CollectorRegistry
) -> None:
    card = extra_student(tmp_path, "3", seed=3)
    response = await admin.post(VERSIONS, headers=AUTH, json={"card": str(card)})
    assert response.status_code == 201, response.text
    assert response.json()["version"] == "3" and response.json()["weight"] == 0
    assert weight(registry, "3") == 0
    # Reachable by name at once; the split is unchanged.
    reply = await admin.post("/v2/models/digits/versions/3/infer", json=infer_body())
    assert served_version(reply) == "3"
    logits = np.asarray(reply.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    np.testing.assert_allclose(logits, reference_logits(ROW, seed=3), atol=1e-5)
    metadata = await admin.get("/v2/models/digits")
    assert metadata.json()["versions"] == ["1", "2", "3"]

    promoted = await admin.post(TRAFFIC + "/promote", headers=AUTH, json={"version": "3"})
    assert promoted.json()["weights"] == {"1": 0, "2": 0, "3": 100}
    replies = await asyncio.gather(*(admin.post(INFER, json=infer_body()) for _ in range(50)))
    assert {served_version(r) for r in replies} == {"3"}

    rolled = await admin.post(TRAFFIC + "/rollback", headers=AUTH)
    assert rolled.json()["weights"] == {"1": 90, "2": 10, "3": 0}
    listed = (await admin.get(VERSIONS, headers=AUTH)).json()
    assert [v["version"] for v in listed["versions"]] == ["1", "2", "3"]
    assert listed["previous_weights"] == {"1": 0, "2": 0, "3": 100}
    duplicate = await admin.post(VERSIONS, headers=AUTH, json={"card": str(card)})
    assert duplicate.status_code == 400 and "already has version '3'" in duplicate.text


async def test_a_version_that_does_not_match_its_card_never_serves(
    admin: httpx.AsyncClient, tmp_path: Path, settings: Settings
) -> None:
    card = tampered_student(tmp_path, "5")
    response = await admin.post(VERSIONS, headers=AUTH, json={"card": str(card)})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "refused" in error and "sha256" in error and "does not match" in error
    explicit = await admin.post("/v2/models/digits/versions/5/infer", json=infer_body())
    assert explicit.status_code == 404
    put = await admin.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 50, "5": 50}})
    assert put.status_code == 400
    listed = (await admin.get(VERSIONS, headers=AUTH)).json()["versions"]
    assert [v["version"] for v in listed] == ["1", "2"]
    assert not (settings.admin.state_dir / "traffic.json").exists()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"card": "/nonexistent/student.card.json"}, "No such file"),
        ({"card": "CARD", "version": "bad version!"}, "version"),
        ({"card": "TEACHER"}, "teacher card"),
    ],
)
async def test_load_refusals_say_why(
    admin: httpx.AsyncClient, tmp_path: Path, body: dict[str, str], reason: str
) -> None:
    card = extra_student(tmp_path, "4", seed=4)
    teacher = card.with_name("teacher.card.json")
    teacher.write_text(card.read_text().replace('"role": "student"', '"role": "teacher"'))
    body = {k: {"CARD": str(card), "TEACHER": str(teacher)}.get(v, v) for k, v in body.items()}
    response = await admin.post(VERSIONS, headers=AUTH, json=body)
    assert response.status_code == 400
    assert reason in response.json()["error"], response.json()


async def test_remove_waits_for_the_requests_on_that_version(
    admin: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    await admin.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 100}})
    body = json.dumps(infer_body()).encode()
    reading = asyncio.Event()
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        reading.set()  # the server picked version 2 and started reading the body
        yield body[:10]
        await release.wait()
        yield body[10:]

    in_flight = asyncio.create_task(
        admin.post("/v2/models/digits/versions/2/infer", content=slow_body())
    )
    await asyncio.wait_for(reading.wait(), timeout=10)
    removal = asyncio.create_task(admin.delete(VERSIONS + "/2", headers=AUTH))
    done, _ = await asyncio.wait({removal}, timeout=0.5)
    assert not done, "the removal answered while a request on version 2 was still running"
    # Already out of the routing: no new request reaches version 2.
    gone = await admin.post("/v2/models/digits/versions/2/infer", json=infer_body())
    assert gone.status_code == 404
    release.set()
    assert served_version(await in_flight) == "2"
    removed = await asyncio.wait_for(removal, timeout=10)
    assert removed.status_code == 200, removed.text
    assert removed.json()["drained"] is True and removed.json()["drain_seconds"] > 0.3
    assert weight(registry, "2") is None
    assert (await admin.get(TRAFFIC, headers=AUTH)).json()["weights"] == {"1": 100}


async def test_a_version_with_traffic_cannot_be_removed(admin: httpx.AsyncClient) -> None:
    response = await admin.delete(VERSIONS + "/2", headers=AUTH)
    assert response.status_code == 400
    assert "still takes 10%" in response.json()["error"]
    missing = await admin.delete(VERSIONS + "/9", headers=AUTH)
    assert missing.status_code == 404


async def test_rollback_without_a_previous_split_is_400(admin: httpx.AsyncClient) -> None:
    response = await admin.post(TRAFFIC + "/rollback", headers=AUTH)
    assert response.status_code == 400 and "no previous weights" in response.json()["error"]


async def test_changes_are_audited_without_the_token(
    admin: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kdgate.audit")
    await admin.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 80, "2": 20}})
    (record,) = [r for r in caplog.records if r.name == "kdgate.audit"]
    line = json.loads(record.getMessage().removeprefix("audit "))
    assert line["action"] == "traffic.put" and line["model"] == "digits"
    assert line["who"].startswith("sha256:") and line["from"] == "127.0.0.1"
    assert line["before"]["weights"] == {"1": 90, "2": 10}
    assert line["after"]["weights"] == {"1": 80, "2": 20}
    assert TOKEN not in caplog.text


async def test_saved_state_is_restored_by_a_new_app(settings: Settings, tmp_path: Path) -> None:
    card = extra_student(tmp_path, "3", seed=3)
    async with running(create_app(settings)) as first:
        await first.post(VERSIONS, headers=AUTH, json={"card": str(card)})
        await first.put(
            TRAFFIC,
            headers=AUTH,
            json={"weights": {"1": 0, "2": 0, "3": 100}, "shadow_fraction": 0},
        )
    async with running(create_app(settings)) as second:
        traffic = (await second.get(TRAFFIC, headers=AUTH)).json()
        assert traffic["weights"] == {"1": 0, "2": 0, "3": 100}
        assert traffic["shadow_fraction"] == 0
        assert served_version(await second.post(INFER, json=infer_body())) == "3"
        rolled = await second.post(TRAFFIC + "/rollback", headers=AUTH)
        assert rolled.json()["weights"] == {"1": 90, "2": 10, "3": 0}


async def test_a_change_that_cannot_be_saved_is_not_applied(settings: Settings) -> None:
    async with running(create_app(settings)) as client:
        # The state directory turns into a file: saving must fail, and the split must not move.
        settings.admin.state_dir.write_text("")
        response = await client.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 50, "2": 50}})
        assert response.status_code == 500
        assert "not changed: could not save" in response.json()["error"]
        assert (await client.get(TRAFFIC, headers=AUTH)).json()["weights"] == {"1": 90, "2": 10}


def with_limits(
    settings: Settings, server: dict[str, object], admin: dict[str, object]
) -> Settings:
    return settings.model_copy(
        update={
            "server": settings.server.model_copy(update=server),
            "admin": settings.admin.model_copy(update=admin),
        }
    )


@contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A named pipe nobody writes to; any reader left blocked on it is let go at the end."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        # Succeeds only while a reader waits: opening and closing the write end ends its read.
        with suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def card_naming(directory: Path, onnx_file: str, version: str = "7") -> Path:
    """A valid student card whose model file is `onnx_file` (relative to the card)."""
    card = extra_student(directory, version, seed=7)
    card.write_text(card.read_text().replace(f'"student-v{version}.onnx"', f'"{onnx_file}"'))
    return card


async def test_cards_and_model_files_that_are_not_regular_files_are_400_at_once(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    with fifo(tmp_path / "card.fifo") as card_pipe, fifo(tmp_path / "model.fifo") as model_pipe:
        cases = {
            str(card_pipe): "a FIFO",
            str(tmp_path): "a directory",
            "/dev/zero": "a character device",
            str(card_naming(tmp_path / "a", f"../../{model_pipe.name}")): "a FIFO",
            str(card_naming(tmp_path / "b", "../../a")): "a directory",
        }
        for card, kind in cases.items():
            response = await asyncio.wait_for(
                admin.post(VERSIONS, headers=AUTH, json={"card": card}), timeout=10
            )
            assert response.status_code == 400, (card, response.text)
            assert f"is {kind}, not a regular file" in response.json()["error"]
    put = await asyncio.wait_for(
        admin.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 50, "2": 50}}), timeout=10
    )
    assert put.status_code == 200, put.text


async def test_a_model_file_of_another_size_than_its_card_records_is_400(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    card = extra_student(tmp_path, "6", seed=6)
    onnx_file = card.with_name("student-v6.onnx")
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0" * 100)
    response = await admin.post(VERSIONS, headers=AUTH, json={"card": str(card)})
    assert response.status_code == 400
    assert "bytes but its card records" in response.json()["error"]


async def test_a_load_that_hangs_is_given_up_and_frees_the_admin_api(
    settings: Settings, tmp_path: Path
) -> None:
    release = threading.Event()

    def loader(student: StudentSettings, server: ServerSettings) -> StudentSession:
        if student.version == "3":
            release.wait(60)  # a read stuck on a stalled mount
        return load_student(student, server)

    limited = with_limits(settings, {}, {"timeout_seconds": 1.0})
    card = extra_student(tmp_path, "3", seed=3)
    try:
        async with running(create_app(limited, student_loader=loader)) as client:
            started = time.monotonic()
            load = asyncio.create_task(
                client.post(VERSIONS, headers=AUTH, json={"card": str(card)})
            )
            await asyncio.sleep(0.2)
            # Waits for the lock while the load runs, and gets it once the load is given up.
            put = await asyncio.wait_for(
                client.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 50, "2": 50}}), 10
            )
            refused = await asyncio.wait_for(load, 10)
            assert refused.status_code == 504, refused.text
            assert "admin.timeout_seconds" in refused.json()["error"]
            assert put.status_code in (200, 504), put.text
            assert time.monotonic() - started < 5
            again = await client.put(TRAFFIC, headers=AUTH, json={"weights": {"1": 80, "2": 20}})
            assert again.status_code == 200, again.text
            listed = (await client.get(VERSIONS, headers=AUTH)).json()["versions"]
            assert [v["version"] for v in listed] == ["1", "2"]
    finally:
        release.set()


async def test_admin_bodies_over_the_limit_are_413_and_unread(settings: Settings) -> None:
    limited = with_limits(settings, {"max_body_bytes": 1024}, {})
    big = b'{"weights": {"1": 50, "2": 50}, "sticky_header": "' + b"x" * 4096 + b'"}'

    async def streamed() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    async with running(create_app(limited)) as client:
        for url in (TRAFFIC, TRAFFIC + "/promote", VERSIONS):
            method = "PUT" if url == TRAFFIC else "POST"
            for content in (big, streamed()):
                response = await client.request(method, url, headers=AUTH, content=content)
                assert response.status_code == 413, (url, response.text)
                assert "over the 1024-byte limit" in response.json()["error"]
        assert (await client.get(TRAFFIC, headers=AUTH)).json()["weights"] == {"1": 90, "2": 10}


async def test_an_admin_body_that_stops_arriving_is_408(settings: Settings) -> None:
    limited = with_limits(settings, {"body_timeout_seconds": 0.3}, {})
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"weights": '
        await never.wait()

    async with running(create_app(limited)) as client:
        started = time.monotonic()
        response = await asyncio.wait_for(
            client.put(TRAFFIC, headers=AUTH, content=stalled()), timeout=10
        )
        assert response.status_code == 408
        assert response.headers["connection"] == "close"
        assert "body_timeout_seconds" in response.json()["error"]
        assert time.monotonic() - started < 5
