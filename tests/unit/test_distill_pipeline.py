from pathlib import Path

import pytest

from kdgate.distill.gates import GateFailure
from kdgate.distill.pipeline import DistillConfig, run
from kdgate.distill.train import TrainSettings
from kdgate.service.cards import load_card, sha256_file

TEACHER_CARD = Path(__file__).resolve().parents[2] / "models" / "digits" / "teacher.card.json"


def _config(out: Path, cache: Path, epochs: int) -> DistillConfig:
    return DistillConfig(
        out=out,
        teacher_card=TEACHER_CARD,
        cache_dir=cache,
        student=TrainSettings(epochs, learning_rate=1e-2),
    )


def test_second_run_uses_cached_soft_labels_and_makes_the_same_student(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run(_config(tmp_path / "a", cache, epochs=40))
    second = run(_config(tmp_path / "b", cache, epochs=40))
    assert (first.soft_labels_cached, second.soft_labels_cached) == (False, True)
    assert len(list(cache.glob("*.npz"))) == 1
    # Seeded and deterministic: the same soft labels give the same file, byte for byte.
    assert sha256_file(tmp_path / "a" / "student-v1.onnx") == first.student.sha256
    assert first.student.sha256 == second.student.sha256

    card = load_card(first.student_card)
    assert card.parent_teacher_sha256 == load_card(TEACHER_CARD).sha256
    assert card.metrics.gates == {
        "accuracy": True,
        "agreement": True,
        "calibration": True,
        "size": True,
    }
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "student-v1.card.json",
        "student-v1.onnx",
    ]


def test_a_bad_student_fails_the_run_and_leaves_out_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "student-v1.onnx").write_bytes(b"the previous student")
    # One epoch of training makes a student far from its teacher.
    with pytest.raises(GateFailure, match="agreement with the teacher"):
        run(_config(out, tmp_path / "cache", epochs=1))
    assert [p.name for p in out.iterdir()] == ["student-v1.onnx"]
    assert (out / "student-v1.onnx").read_bytes() == b"the previous student"
