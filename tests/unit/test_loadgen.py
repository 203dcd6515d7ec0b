"""service/loadgen.py: the drift transforms against brute force, and the CLI's argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from kdgate.service.loadgen import drifted, main

ROWS = np.random.default_rng(0).integers(0, 17, (20, 64)).astype(np.float32)


def test_none_is_an_unchanged_copy() -> None:
    out = drifted(ROWS, "none", 0.3, np.random.default_rng(0))
    assert np.array_equal(out, ROWS) and out is not ROWS


def test_invert_is_sixteen_minus_the_pixel() -> None:
    out = drifted(ROWS, "invert", 0.3, np.random.default_rng(0))
    assert out.dtype == np.float32
    for r in range(len(ROWS)):
        for c in range(64):
            assert out[r, c] == 16 - ROWS[r, c]


@pytest.mark.parametrize(("strength", "k"), [(0.1, 1), (0.25, 1), (0.5, 2)])
def test_shift_moves_the_image_right_and_down(strength: float, k: int) -> None:
    out = drifted(ROWS, "shift", strength, np.random.default_rng(0))
    for r in range(len(ROWS)):
        for y in range(8):
            for x in range(8):
                expected = ROWS[r, (y - k) * 8 + (x - k)] if y >= k and x >= k else 0
                assert out[r, y * 8 + x] == expected


def test_noise_stays_in_range_and_has_the_asked_spread() -> None:
    rows = np.full((2000, 64), 8.0, dtype=np.float32)  # mid-range: clipping is rare
    out = drifted(rows, "noise", 0.1, np.random.default_rng(1))
    assert out.min() >= 0 and out.max() <= 16
    assert np.std(out - rows) == pytest.approx(1.6, rel=0.02)


def test_shift_needs_square_images() -> None:
    with pytest.raises(ValueError, match="8x8"):
        drifted(np.zeros((1, 10), np.float32), "shift", 0.3, np.random.default_rng(0))


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--feedback", "1.5"], ["--batch", "0"]])
def test_nonsense_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
