"""`kdgate distill`: make a teacher/student pair, or a new student from a capture.

    kdgate distill --out models/digits                       # teacher + student v1 + reference
    kdgate distill --out models/digits --teacher-card models/digits/teacher.card.json \\
        --student-version 2                                  # new student, cached soft labels
    kdgate distill --out models/digits --capture var/capture/ --student-version 2
    kdgate distill ... --capture var/capture/ --capture-mix train   # capture + train split

Exit status: 0 when the student passed every gate and was written, 1 when the run was rejected
(parity, gates, unreadable capture or teacher), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdgate.distill.capture import CaptureError
from kdgate.distill.export import ParityError
from kdgate.distill.gates import GateFailure, GateThresholds
from kdgate.distill.pipeline import DistillConfig, run
from kdgate.distill.train import TrainSettings
from kdgate.service.cards import ModelFileMismatch

_DEFAULT = DistillConfig(out=Path("."))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by `kdgate distill --help`)."""
    p = argparse.ArgumentParser(
        prog="kdgate distill", description="Distil a student from a teacher and gate it."
    )
    p.add_argument("--out", type=Path, required=True, help="directory for models and cards")
    p.add_argument("--temperature", type=float, default=_DEFAULT.temperature)
    p.add_argument("--alpha", type=float, default=_DEFAULT.alpha, help="weight of the label CE")
    p.add_argument("--epochs", type=int, default=_DEFAULT.student.epochs, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=_DEFAULT.teacher.epochs)
    p.add_argument("--seed", type=int, default=_DEFAULT.seed)
    p.add_argument("--student-version", default=_DEFAULT.student_version)
    p.add_argument("--teacher-card", type=Path, help="use this teacher instead of training one")
    p.add_argument(
        "--capture",
        type=Path,
        help=".npz file or directory of (inputs, teacher_logits[, labels]) to train on",
    )
    p.add_argument(
        "--capture-mix",
        choices=["none", "train"],
        default=_DEFAULT.capture_mix,
        help="train: add the digits train split (teacher logits) to the capture rows",
    )
    p.add_argument("--cache-dir", type=Path, help="soft-label cache (default ~/.cache/kdgate)")
    p.add_argument("--threads", type=int, default=_DEFAULT.threads, help="torch threads")
    limits = GateThresholds()
    p.add_argument("--max-accuracy-drop", type=float, default=limits.max_accuracy_drop)
    p.add_argument("--min-agreement", type=float, default=limits.min_agreement)
    p.add_argument("--max-ece", type=float, default=limits.max_ece)
    p.add_argument("--min-size-ratio", type=float, default=limits.min_size_ratio)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one distillation; print a summary; return the exit status."""
    args = build_parser().parse_args(argv)
    student = _DEFAULT.student
    config = DistillConfig(
        out=args.out,
        temperature=args.temperature,
        alpha=args.alpha,
        seed=args.seed,
        student_version=args.student_version,
        student=TrainSettings(args.epochs, student.batch_size, student.learning_rate),
        teacher=TrainSettings(
            args.teacher_epochs, _DEFAULT.teacher.batch_size, _DEFAULT.teacher.learning_rate
        ),
        teacher_card=args.teacher_card,
        capture=args.capture,
        capture_mix=args.capture_mix,
        cache_dir=args.cache_dir,
        limits=GateThresholds(
            args.max_accuracy_drop, args.min_agreement, args.max_ece, args.min_size_ratio
        ),
        threads=args.threads,
    )
    try:
        result = run(config)
    except (GateFailure, ParityError, CaptureError, ModelFileMismatch, OSError, ValueError) as exc:
        print(f"kdgate distill: {exc}", file=sys.stderr)
        return 1
    m = result.student.metrics
    print(
        f"student v{result.student.version}: accuracy {m.accuracy:.2%} "
        f"(teacher {m.teacher_accuracy:.2%}), agreement {m.agreement:.2%}, "
        f"KL {m.kl_mean_nats:.4f} nats, ECE {m.ece:.4f}, {result.student.bytes} bytes "
        f"({m.size_ratio:.0f}x smaller); soft labels "
        f"{'from cache' if result.soft_labels_cached else 'computed'}\n"
        f"wrote {result.student_card} (teacher {result.teacher_card})"
    )
    return 0
