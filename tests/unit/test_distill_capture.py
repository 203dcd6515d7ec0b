from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdgate.distill.capture import CaptureError, load_capture

RNG = np.random.default_rng(3)


def _write(path: Path, rows: int, labels: bool) -> dict[str, Any]:
    arrays: dict[str, Any] = {
        "inputs": RNG.uniform(0, 16, size=(rows, 64)).astype(np.float32),
        "teacher_logits": RNG.normal(size=(rows, 10)).astype(np.float32),
    }
    if labels:
        arrays["labels"] = RNG.integers(0, 10, rows).astype(np.int64)
    np.savez(path, **arrays)
    return arrays


def test_a_directory_is_read_in_name_order_and_missing_labels_become_minus_one(
    tmp_path: Path,
) -> None:
    b = _write(tmp_path / "b.npz", 3, labels=False)
    a = _write(tmp_path / "a.npz", 5, labels=True)
    (tmp_path / "notes.txt").write_text("not a capture")
    cap = load_capture(tmp_path)
    assert cap.files == ["a.npz", "b.npz"]
    np.testing.assert_array_equal(cap.inputs, np.concatenate([a["inputs"], b["inputs"]]))
    np.testing.assert_array_equal(cap.labels, np.concatenate([a["labels"], [-1, -1, -1]]))
    assert cap.describe()["sizes"] == {"train": 8, "labelled": 5}
    assert load_capture(tmp_path / "a.npz").labels.shape == (5,)
    assert load_capture(tmp_path).sha256 == cap.sha256


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"inputs": np.zeros((2, 64), np.float32)}, "missing array 'teacher_logits'"),
        (
            {"inputs": np.zeros((2, 63), np.float32), "teacher_logits": np.zeros((2, 10))},
            r"inputs shape \(2, 63\), expected \[N>0, 64\]",
        ),
        (
            {"inputs": np.zeros((2, 64), np.float32), "teacher_logits": np.zeros((3, 10))},
            r"teacher_logits shape \(3, 10\), expected \[2, 10\]",
        ),
        (
            {"inputs": np.full((1, 64), np.nan, np.float32), "teacher_logits": np.zeros((1, 10))},
            "must be finite",
        ),
        (
            {
                "inputs": np.zeros((1, 64), np.float32),
                "teacher_logits": np.zeros((1, 10)),
                "labels": np.array([10]),
            },
            "labels must be int",
        ),
    ],
)
def test_bad_files_are_refused_with_the_file_named(
    tmp_path: Path, arrays: dict[str, Any], message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CaptureError, match=message) as caught:
        load_capture(tmp_path)
    assert "bad.npz" in str(caught.value)


def test_pickled_objects_are_not_loaded(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "evil.npz",
        inputs=np.array([{"a": 1}], dtype=object),
        teacher_logits=np.zeros((1, 10)),
    )
    with pytest.raises(CaptureError, match="not a readable"):
        load_capture(tmp_path)


def test_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="no capture"):
        load_capture(tmp_path)


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_the_gateways_segments_are_read_as_digits_logits(tmp_path: Path, kind: str) -> None:
    """What monitoring/capture.py writes (inputs by name, teacher scores and their kind) trains
    digits: probabilities come back as logits whose softmax is those probabilities."""
    import asyncio

    from scipy.special import softmax

    from kdgate.monitoring.capture import CaptureStore

    x = RNG.uniform(0, 16, size=(12, 64)).astype(np.float32)
    logits = RNG.normal(size=(12, 10))
    scores = (logits if kind == "logits" else softmax(logits, axis=1)).astype(np.float32)

    async def main() -> None:
        store = CaptureStore(tmp_path, teacher_kind=kind, segment_rows=5, max_rows=100)
        for lo in range(0, 12, 4):
            store.append({"input": x[lo : lo + 4]}, scores[lo : lo + 4])
        await store.aclose()

    asyncio.run(main())
    cap = load_capture(tmp_path)
    np.testing.assert_array_equal(cap.inputs, x)
    np.testing.assert_allclose(
        softmax(cap.teacher_logits, axis=1), softmax(logits, axis=1), rtol=1e-5, atol=1e-7
    )
    assert (cap.labels == -1).all()


def test_a_gateway_capture_of_several_inputs_is_not_digits(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "c.npz",
        **{
            "inputs/input_ids": np.zeros((2, 6), np.int64),
            "inputs/attention_mask": np.ones((2, 6), np.int64),
            "teacher_scores": np.zeros((2, 10), np.float32),
            "teacher_kind": np.array("logits"),
        },
    )
    with pytest.raises(CaptureError, match="one input"):
        load_capture(tmp_path)
