from pathlib import Path

import numpy as np
import pytest

from kdgate.distill.soft_labels import CacheKey, SoftLabelCache, default_cache_dir, teacher_logits


class SpyTeacher:
    """A linear 'teacher' that counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        self.calls += 1
        return inputs @ self.weights


INPUTS = np.random.default_rng(1).uniform(0, 16, size=(50, 64)).astype(np.float32)
KEY = CacheKey("a" * 64, "b" * 64, 4.0)


def test_second_run_reuses_the_cache_without_calling_the_teacher(tmp_path: Path) -> None:
    teacher = SpyTeacher()
    first, cached_first = teacher_logits(SoftLabelCache(tmp_path), KEY, teacher, INPUTS)
    # A new cache object over the same directory: what a later student run sees.
    second, cached_second = teacher_logits(SoftLabelCache(tmp_path), KEY, teacher, INPUTS)
    assert (cached_first, cached_second) == (False, True)
    assert teacher.calls == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(second, INPUTS @ teacher.weights, rtol=1e-6)


def test_each_part_of_the_key_separates_entries(tmp_path: Path) -> None:
    teacher = SpyTeacher()
    cache = SoftLabelCache(tmp_path)
    teacher_logits(cache, KEY, teacher, INPUTS)
    for other in (
        CacheKey("c" * 64, KEY.dataset_sha256, KEY.temperature),
        CacheKey(KEY.teacher_sha256, "d" * 64, KEY.temperature),
        CacheKey(KEY.teacher_sha256, KEY.dataset_sha256, 2.0),
    ):
        _, cached = teacher_logits(cache, other, teacher, INPUTS)
        assert not cached
    assert teacher.calls == 4
    assert len(list(tmp_path.glob("*.npz"))) == 4


def test_a_renamed_or_stale_entry_is_a_miss(tmp_path: Path) -> None:
    cache = SoftLabelCache(tmp_path)
    other = CacheKey(KEY.teacher_sha256[:16] + "e" * 48, KEY.dataset_sha256, KEY.temperature)
    assert other.filename == KEY.filename  # same file name, different full key
    cache.store(other, np.zeros((50, 10), np.float32))
    assert cache.load(KEY, rows=50) is None
    cache.store(KEY, np.zeros((49, 10), np.float32))
    assert cache.load(KEY, rows=50) is None  # wrong number of rows


def test_default_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "kdgate" / "soft-labels"
