import numpy as np

from kdgate.distill.data import load_split


def test_split_is_stratified_disjoint_and_complete() -> None:
    split = load_split(0)
    parts = (split.train, split.validation, split.test)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1797
    assert [round(s / 1797, 2) for s in sizes] == [0.6, 0.2, 0.2]
    everything = np.concatenate([p.indices for p in parts])
    assert np.array_equal(np.sort(everything), np.arange(1797))
    overall = np.bincount(np.concatenate([p.labels for p in parts]), minlength=10) / 1797
    for part in parts:
        share = np.bincount(part.labels, minlength=10) / len(part)
        assert np.abs(share - overall).max() < 0.01
    assert split.train.inputs.dtype == np.float32
    assert split.train.inputs.shape[1] == 64
    assert split.train.inputs.min() >= 0.0 and split.train.inputs.max() <= 16.0


def test_hash_is_stable_for_a_seed_and_changes_with_it() -> None:
    first, again, other = load_split(0), load_split(0), load_split(1)
    assert first.sha256 == again.sha256
    assert np.array_equal(first.test.indices, again.test.indices)
    assert other.sha256 != first.sha256
    assert first.describe()["sizes"] == {"train": 1078, "validation": 359, "test": 360}
