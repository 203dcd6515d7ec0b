"""Router: weighted split, sticky keys, explicit versions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.metrics import Metrics
from service.errors import ModelNotFound
from service.routing import Router, Variant
from service.runtime import StudentSession
from tests.support.tiny_model import write_tiny_student


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> StudentSession:
    return StudentSession.from_card(write_tiny_student(Path(tmp_path_factory.mktemp("r"))))


def router(session: StudentSession, weights: dict[str, int]) -> Router:
    metrics = Metrics(CollectorRegistry())
    variants = {v: Variant("digits", session, v, metrics) for v in weights}
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
