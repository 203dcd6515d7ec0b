import pytest

from kdgate.monitoring.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_then_probes_and_recovers() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_seconds=10.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == "closed"
    assert b.allow()
    b.record_failure()
    assert b.state == "open"
    assert not b.allow()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()  # the probe
    assert b.state == "half_open"
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state == "closed"
    assert b.allow()


def test_success_resets_the_count_of_consecutive_failures() -> None:
    b = CircuitBreaker(failure_threshold=2, clock=Clock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state == "closed"


def test_a_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_seconds=5.0, clock=clock)
    b.record_failure()
    clock.now += 5.0
    assert b.allow()
    b.record_failure()
    assert b.state == "open"
    clock.now += 4.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()


def test_a_lost_probe_is_replaced_after_a_cool_down() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_seconds=5.0, clock=clock)
    b.record_failure()
    clock.now += 5.0
    assert b.allow()  # this probe never reports back
    clock.now += 5.0
    assert b.allow()


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
