import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdgate.distill.cli import main
from kdgate.distill.data import load_split
from kdgate.distill.export import run, session
from kdgate.service.cards import load_card

MODELS = Path(__file__).resolve().parents[2] / "models" / "digits"


def test_a_student_trained_from_an_unlabelled_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the gateway's shadow capture writes: inputs and teacher logits, no labels.
    inputs = load_split(0).train.inputs
    capture = tmp_path / "capture"
    capture.mkdir()
    teacher = session(MODELS / "teacher.onnx")
    for i, rows in enumerate(np.array_split(inputs, 2)):
        np.savez(capture / f"part-{i}.npz", inputs=rows, teacher_logits=run(teacher, rows))
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--out", str(out), "--capture", str(capture), "--student-version", "2"]
    argv += ["--teacher-card", str(MODELS / "teacher.card.json"), "--epochs", "60"]
    assert main([*argv, "--cache-dir", str(cache)]) == 0

    card = load_card(out / "student-v2.card.json")
    assert card.version == "2" and card.file == "student-v2.onnx"
    assert card.parent_teacher_sha256 == load_card(MODELS / "teacher.card.json").sha256
    assert card.dataset["training"]["sizes"] == {"train": inputs.shape[0], "labelled": 0}
    assert card.hyperparameters["training_data"] == "capture"
    assert card.metrics.agreement >= 0.95
    assert not cache.exists()  # the capture's logits were used; the teacher was not run on them
    assert "student v2" in capsys.readouterr().out


def test_a_rejected_run_exits_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--teacher-card", str(MODELS / "teacher.card.json")]
    assert main([*argv, "--epochs", "1", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "student rejected by" in capsys.readouterr().err
    assert not (tmp_path / "student-v1.onnx").exists()


def test_a_capture_without_a_teacher_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path), "--capture", str(tmp_path)]) == 1
    assert "teacher.card.json" in capsys.readouterr().err


def test_bad_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--temperature", "4"])  # --out is required
    assert caught.value.code == 2


def test_python_dash_m_distill() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kdgate.distill", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--capture" in done.stdout and "--student-version" in done.stdout


def test_capture_mix_train_adds_the_train_split_to_the_capture(tmp_path: Path) -> None:
    split = load_split(0)
    inverted = (16.0 - split.train.inputs[:100]).astype(np.float32)
    teacher = session(MODELS / "teacher.onnx")
    np.savez(tmp_path / "capture.npz", inputs=inverted, teacher_logits=run(teacher, inverted))
    argv = ["--out", str(tmp_path / "out"), "--capture", str(tmp_path / "capture.npz")]
    argv += ["--teacher-card", str(MODELS / "teacher.card.json"), "--capture-mix", "train"]
    argv += ["--epochs", "2", "--cache-dir", str(tmp_path / "cache"), "--student-version", "3"]
    loose = ["--min-agreement", "0", "--max-accuracy-drop", "1", "--max-ece", "1"]
    assert main([*argv, *loose]) == 0
    card = load_card(tmp_path / "out" / "student-v3.card.json")
    assert card.hyperparameters["training_data"] == "capture + digits train split"
    training = card.dataset["training"]
    assert training["mixed_with"] == "train split"
    assert training["sizes"]["train"] == 100  # the capture's rows; the split's are in `sizes`
    assert card.dataset["sizes"]["train"] == len(split.train)
    assert (tmp_path / "cache").is_dir()  # the teacher ran on the train split (soft labels)
