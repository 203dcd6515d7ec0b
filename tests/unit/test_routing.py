"""Router: weighted split, sticky keys, explicit versions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kdgate.service.errors import ModelNotFound
from kdgate.service.routing import Router, Variant
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import TrafficSettings
from tests.support.tiny_model import write_tiny_student


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> StudentSession:
    return StudentSession.from_card(write_tiny_student(Path(tmp_path_factory.mktemp("r"))))


def router(session: StudentSession, weights: dict[str, int]) -> Router:
    variants = {v: Variant("digits", session, v) for v in weights}
    return Router("digits", variants, weights, "x-key")


def test_split_follows_the_weights(session: StudentSession) -> None:
    r = router(session, {"1": 90, "2": 10})
    counts = Counter(r.pick(None).version for _ in range(20_000))
    # Binomial(20000, 0.1): sd ~42, so +-250 is ~6 sd.
    assert abs(counts["2"] - 2000) < 250


def test_sticky_key_keeps_its_variant_and_keys_spread(session: StudentSession) -> None:
    r = router(session, {"1": 50, "2": 50})
    for key in (b"alice", b"bob", b"carol"):
        assert len({r.pick(key).version for _ in range(50)}) == 1
    spread = Counter(r.pick(f"user-{i}".encode()).version for i in range(2000))
    assert 800 < spread["1"] < 1200


def test_explicit_version_and_unknown_version(session: StudentSession) -> None:
    r = router(session, {"1": 100, "2": 0})
    assert r.get("2").version == "2"
    assert all(r.pick(None).version == "1" for _ in range(100))
    with pytest.raises(ModelNotFound, match="no version '7'"):
        r.get("7")


def test_weights_must_cover_100_percent(session: StudentSession) -> None:
    with pytest.raises(ValueError, match="sum to 100"):
        router(session, {"1": 40})


def test_traffic_object_lists_every_version_and_carries_the_shadow_fraction(
    session: StudentSession,
) -> None:
    variants = {v: Variant("digits", session, v) for v in ("1", "2", "3")}
    traffic = TrafficSettings(weights={"2": 100}, sticky_header="X-Key", shadow_fraction=0.25)
    r = Router.from_traffic("digits", variants, traffic)
    assert r.shadow_fraction == 0.25 and r.sticky_header == b"x-key"
    assert r.traffic == TrafficSettings(
        weights={"1": 0, "2": 100, "3": 0}, sticky_header="x-key", shadow_fraction=0.25
    )
    assert r.default.version == "2"


def test_sticky_assignment_ignores_the_order_of_the_weights(session: StudentSession) -> None:
    keys = [f"user-{i}".encode() for i in range(500)]
    one = router(session, {"1": 60, "2": 40})
    variants = {v: Variant("digits", session, v) for v in ("1", "2")}
    other = Router("digits", variants, {"2": 40, "1": 60}, "x-key")
    assert [one.pick(k).version for k in keys] == [other.pick(k).version for k in keys]


@pytest.mark.parametrize(("low", "high"), [(1, 5), (5, 50), (10, 90), (50, 100)])
def test_raising_the_canary_weight_only_moves_callers_onto_it(
    session: StudentSession, low: int, high: int
) -> None:
    keys = [f"user-{i}".encode() for i in range(3000)]
    before = router(session, {"1": 100 - low, "2": low})
    after = router(session, {"1": 100 - high, "2": high})
    moved = [(before.pick(k).version, after.pick(k).version) for k in keys]
    assert ("2", "1") not in moved
    share = sum(a == "2" for _, a in moved) / len(keys)
    # crc32 of distinct keys spreads over the 100 slots: the share is near the weight.
    assert abs(share - high / 100) < 0.04
