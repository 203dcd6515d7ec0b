import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdgate.monitoring.window import BucketedWindow


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_values_leave_the_window_after_it_has_passed() -> None:
    clock = Clock(1000.0)
    w = BucketedWindow(2, window_seconds=30, bucket_seconds=10, clock=clock)
    assert w.buckets == 3
    w.add([1.0, 10.0])
    clock.now = 1015.0
    w.add([2.0, 20.0])
    assert w.total().tolist() == [3.0, 30.0]
    clock.now = 1029.9  # bucket 102: buckets 100..102 are live
    assert w.total().tolist() == [3.0, 30.0]
    clock.now = 1030.0  # bucket 103: the first add (bucket 100) has left
    assert w.total().tolist() == [2.0, 20.0]
    w.add([5.0, 0.0])  # reuses the slot of bucket 100, which must be reset first
    assert w.total().tolist() == [7.0, 20.0]
    clock.now = 2000.0
    assert w.total().tolist() == [0.0, 0.0]


def test_rejects_wrong_shapes_and_settings() -> None:
    w = BucketedWindow(3, window_seconds=10, clock=Clock())
    with pytest.raises(ValueError, match="vector of 3"):
        w.add([1.0, 2.0])
    with pytest.raises(ValueError, match="bucket_seconds"):
        BucketedWindow(1, window_seconds=5, bucket_seconds=10)


def test_clear() -> None:
    w = BucketedWindow(1, window_seconds=10, clock=Clock())
    w.add([4.0])
    w.clear()
    assert w.total().tolist() == [0.0]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 50, allow_nan=False), st.integers(0, 5)), max_size=60),
    st.integers(1, 9),
)
def test_matches_a_brute_force_log_of_events(steps: list[tuple[float, int]], buckets: int) -> None:
    clock = Clock(0.0)
    w = BucketedWindow(1, window_seconds=buckets * 10.0, bucket_seconds=10.0, clock=clock)
    events: list[tuple[float, int]] = []
    for advance, value in steps:
        clock.now += advance
        w.add([value])
        events.append((clock.now, value))
        now_bucket = int(clock.now // 10)
        expected = sum(v for t, v in events if int(t // 10) > now_bucket - buckets)
        assert w.total()[0] == expected
    assert np.isfinite(w.total()).all()
