"""One distillation run: teacher -> soft labels -> student -> ONNX -> gates -> model cards.

    run(DistillConfig(out=Path("models/digits")))

trains a teacher CNN (or loads one from `teacher_card`), gets its logits for the training inputs
(from the soft-label cache when possible, or from a `capture`), distils the student MLP, exports
both to ONNX, checks torch/onnxruntime parity, measures both files with onnxruntime on the test
split, enforces the gates and only then moves the files into `out`. Everything is written to a
staging directory first, so a failed run (parity, gates) leaves `out` as it was.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from kdgate.distill import evaluate, export, gates
from kdgate.distill.capture import load_capture
from kdgate.distill.data import DigitsSplit, Part, load_split
from kdgate.distill.losses import kd_loss
from kdgate.distill.model_card import build_card
from kdgate.distill.nets import count_parameters, student_mlp, teacher_cnn
from kdgate.distill.soft_labels import CacheKey, SoftLabelCache, default_cache_dir, teacher_logits
from kdgate.distill.train import TrainSettings, fit, seed_everything
from kdgate.monitoring.card_figures import CardFigures, SplitFigures
from kdgate.service.cards import ModelCard, load_card, verify_model_file, write_card

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DistillConfig:
    """Everything a run depends on; the defaults make the committed models/digits pair."""

    out: Path
    temperature: float = 4.0
    alpha: float = 0.2
    seed: int = 0
    student_version: str = "1"
    student_hidden: int = 64
    student: TrainSettings = field(default_factory=lambda: TrainSettings(200, learning_rate=1e-2))
    teacher: TrainSettings = field(default_factory=lambda: TrainSettings(30, learning_rate=3e-3))
    teacher_card: Path | None = None
    capture: Path | None = None
    # "train": the capture rows plus the digits train split with the teacher's logits for it,
    # so a student retrained on drifted traffic still serves clean inputs; "none": the capture
    # alone.
    capture_mix: Literal["none", "train"] = "none"
    cache_dir: Path | None = None
    limits: gates.GateThresholds = field(default_factory=gates.GateThresholds)
    parity_tolerance: float = export.PARITY_TOLERANCE
    threads: int = 1


@dataclass(frozen=True)
class DistillResult:
    """Where the run wrote its cards, what the gates said, whether soft labels were cached."""

    student_card: Path
    teacher_card: Path
    student: ModelCard
    gate_results: list[gates.GateResult]
    soft_labels_cached: bool


@dataclass
class _Teacher:
    onnx: bytes
    card_path: Path
    new_model: nn.Module | None  # set when this run trained the teacher


def run(config: DistillConfig) -> DistillResult:
    """Run the whole pipeline; raise ParityError or GateFailure (leaving `out` untouched)."""
    seed_everything(config.seed, config.threads)
    split = load_split(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.out, prefix=".staging-") as tmp:
        staging = Path(tmp)
        teacher = _teacher(config, split, staging)
        teacher_session = export.session(teacher.onnx)
        teacher_sha = hashlib.sha256(teacher.onnx).hexdigest()

        x, soft, labels, cached, dataset = _training_set(
            config, split, teacher_session, teacher_sha
        )
        torch.manual_seed(config.seed)  # the same student for the same soft labels, however made
        student = student_mlp(config.student_hidden)
        soft_t, labels_t = torch.from_numpy(soft), torch.from_numpy(labels)
        fit(
            student,
            torch.from_numpy(x),
            lambda out, rows: kd_loss(
                out,
                soft_t[rows],
                labels_t[rows],
                temperature=config.temperature,
                alpha=config.alpha,
            ),
            config.student,
            seed=config.seed,
            desc="student",
        )
        student_onnx = export.export_onnx(student)
        parity = export.check_parity(
            student, student_onnx, split.test.inputs, config.parity_tolerance
        )
        student_session = export.session(student_onnx)

        teacher_test = export.run(teacher_session, split.test.inputs)
        student_test = export.run(student_session, split.test.inputs)
        measured = gates.Measured(
            teacher_accuracy=evaluate.accuracy(teacher_test, split.test.labels),
            student_accuracy=evaluate.accuracy(student_test, split.test.labels),
            agreement=evaluate.agreement(student_test, teacher_test),
            student_ece=evaluate.ece(student_test, split.test.labels),
            teacher_bytes=len(teacher.onnx),
            student_bytes=len(student_onnx),
        )
        results = gates.enforce(measured, config.limits)

        stem = f"student-v{config.student_version}"
        student_path = staging / f"{stem}.onnx"
        student_path.write_bytes(student_onnx)
        card = build_card(
            student_path,
            role="student",
            version=config.student_version,
            parameters=count_parameters(student),
            parent_teacher_sha256=teacher_sha,
            dataset=dataset,
            hyperparameters={
                "architecture": f"MLP 64-{config.student_hidden}-10, ReLU, /16 input scaling",
                "temperature": config.temperature,
                "alpha": config.alpha,
                "seed": config.seed,
                "optimizer": "Adam, cosine learning-rate decay",
                **asdict(config.student),
                "training_data": _training_data(config),
            },
            metrics=_figures(
                student_session,
                split,
                teacher_session,
                teacher_accuracy=measured.teacher_accuracy,
                size_ratio=measured.teacher_bytes / measured.student_bytes,
                parity_max_abs_diff=parity,
                gates={r.name: r.passed for r in results},
            ),
        )
        write_card(staging / f"{stem}.card.json", card)
        names = [f"{stem}.onnx", f"{stem}.card.json"]
        if teacher.new_model is not None:
            names = ["teacher.onnx", "reference.npz", "teacher.card.json", *names]
        for name in names:  # model files before cards: a card never names a missing file
            os.replace(staging / name, config.out / name)
    return DistillResult(
        student_card=config.out / f"{stem}.card.json",
        teacher_card=teacher.card_path,
        student=card,
        gate_results=results,
        soft_labels_cached=cached,
    )


def _teacher(config: DistillConfig, split: DigitsSplit, staging: Path) -> _Teacher:
    """Load the teacher a card names, or train, export and card a new one in `staging`."""
    card_path = config.teacher_card
    if card_path is None and config.capture is not None:
        card_path = config.out / "teacher.card.json"
    if card_path is not None:
        card = load_card(card_path)
        if card.role != "teacher":
            raise ValueError(f"{card_path}: a {card.role} card, expected a teacher card")
        return _Teacher(verify_model_file(card_path, card), card_path, None)

    model = teacher_cnn()
    labels = torch.from_numpy(split.train.labels)
    fit(
        model,
        torch.from_numpy(split.train.inputs),
        lambda out, rows: F.cross_entropy(out, labels[rows]),
        config.teacher,
        seed=config.seed,
        desc="teacher",
    )
    onnx = export.export_onnx(model)
    parity = export.check_parity(model, onnx, split.test.inputs, config.parity_tolerance)
    path = staging / "teacher.onnx"
    path.write_bytes(onnx)
    sess = export.session(onnx)
    np.savez(
        staging / "reference.npz",
        inputs=split.validation.inputs,
        teacher_logits=export.run(sess, split.validation.inputs),
        labels=split.validation.labels,
    )
    card = build_card(
        path,
        role="teacher",
        version="1",
        parameters=count_parameters(model),
        dataset=split.describe(),
        hyperparameters={
            "architecture": "CNN conv3x3(32)-conv3x3(64)-maxpool2-dense(128)-dense(10), "
            "ReLU, dropout 0.25, /16 input scaling",
            "seed": config.seed,
            "optimizer": "Adam, cosine learning-rate decay",
            **asdict(config.teacher),
        },
        metrics=_figures(sess, split, parity_max_abs_diff=parity),
    )
    write_card(staging / "teacher.card.json", card)
    return _Teacher(onnx, config.out / "teacher.card.json", model)


def _training_set(
    config: DistillConfig, split: DigitsSplit, teacher: ort.InferenceSession, teacher_sha: str
) -> tuple[Array, Array, npt.NDArray[np.int64], bool, dict[str, Any]]:
    """(inputs, teacher logits, labels or -1, soft labels came from the cache, card dataset)."""
    dataset = split.describe()
    if config.capture is not None and config.capture_mix == "none":
        cap = load_capture(config.capture)
        dataset["training"] = cap.describe()
        return cap.inputs, cap.teacher_logits, cap.labels, False, dataset
    cache = SoftLabelCache(config.cache_dir or default_cache_dir())
    key = CacheKey(teacher_sha, split.sha256, config.temperature)
    logits, cached = teacher_logits(
        cache, key, lambda x: export.run(teacher, x), split.train.inputs
    )
    if config.capture is None:
        return split.train.inputs, logits, split.train.labels, cached, dataset
    cap = load_capture(config.capture)
    dataset["training"] = {**cap.describe(), "mixed_with": "train split"}
    return (
        np.concatenate([split.train.inputs, cap.inputs]),
        np.concatenate([logits, cap.teacher_logits]),
        np.concatenate([split.train.labels, cap.labels]),
        cached,
        dataset,
    )


def _training_data(config: DistillConfig) -> str:
    """What the student was trained on, in words, for its card."""
    if config.capture is None:
        return "digits train split"
    return "capture + digits train split" if config.capture_mix == "train" else "capture"


def _figures(
    model: ort.InferenceSession,
    split: DigitsSplit,
    teacher: ort.InferenceSession | None = None,
    **more: Any,
) -> CardFigures:
    """Test-split figures flat, validation figures under `validation`, latency, and `more`."""

    def on(part: Part) -> SplitFigures:
        logits = export.run(model, part.inputs)
        agreement = kl_mean = None
        if teacher is not None:
            reference = export.run(teacher, part.inputs)
            agreement = evaluate.agreement(logits, reference)
            kl_mean = evaluate.mean_kl(reference, logits)
        return SplitFigures(
            accuracy=evaluate.accuracy(logits, part.labels),
            ece=evaluate.ece(logits, part.labels),
            agreement=agreement,
            kl_mean_nats=kl_mean,
        )

    return CardFigures(
        split="test",
        **on(split.test).model_dump(exclude_none=True),
        validation=on(split.validation),
        latency_us_per_row={
            "batch_1": export.latency_us_per_row(model, split.test.inputs, 1),
            "batch_32": export.latency_us_per_row(model, split.test.inputs, 32),
        },
        latency_method="onnxruntime CPU, intra_op_num_threads=1, median of 200 runs",
        **more,
    )
