"""Whether a student can be compared with its teacher, and how: read from their model cards.

    pairing = pair_cards(student_card, teacher_card, input_map)   # local teacher: both cards
    pairing = pair_remote(student_card, input_map)                 # remote teacher: the student's
    pairing.reason   # None: comparable; else why not, in one sentence for the log

A pair is compared when each side names a scores output (`cards.scores_output`), both are
classifiers or both regressions, the teacher takes exactly the student's inputs (by name, or
through `input_map`: student name -> teacher name) with the same datatypes and compatible shapes,
and the scores have the same shape beyond the rows (the same number of classes) and the same
class labels. A pair that is not still serves: the monitoring runtime turns its comparison off,
logs `reason` once and exports `kdgate_comparison_enabled{model} 0`.

A remote teacher's card is not known here: it is asked for the student's scores output name
and assumed to be of the student's kind; an answer of another shape fails that batch
(`kdgate_shadow_total{outcome="teacher_error"}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kdgate.monitoring.fidelity import OutputKind
from kdgate.service.cards import ModelCard, TensorSpec, scores_output


@dataclass(frozen=True)
class Pairing:
    """How one model's student and teacher are compared, or `reason` why they are not."""

    student_scores: str | None  # the student's scores output name
    teacher_scores: str | None  # the teacher's scores output name
    student_kind: OutputKind
    teacher_kind: OutputKind
    input_map: dict[str, str] = field(default_factory=dict)  # student name -> teacher name
    reason: str | None = None

    @property
    def comparable(self) -> bool:
        return self.reason is None


def pair_cards(
    student: ModelCard, teacher: ModelCard, input_map: Mapping[str, str] | None = None
) -> Pairing:
    """The pairing of a student with a local teacher, both described by their cards."""
    mapping = dict(input_map or {})
    s_scores, t_scores = scores_output(student), scores_output(teacher)
    pairing = Pairing(s_scores, t_scores, student.output_kind, teacher.output_kind, mapping)
    reason = _scores_reason(student, teacher, s_scores, t_scores) or _inputs_reason(
        student.inputs, teacher.inputs, mapping
    )
    labels = student.class_labels, teacher.class_labels
    if reason is None and all(labels) and labels[0] != labels[1]:
        reason = "the student's and the teacher's class labels differ"
    return replace(pairing, reason=reason)


def pair_remote(student: ModelCard, input_map: Mapping[str, str] | None = None) -> Pairing:
    """The pairing of a student with a remote teacher (see the module doc)."""
    s_scores = scores_output(student)
    reason = None if s_scores is not None else _no_scores("student", student)
    kind = student.output_kind
    return Pairing(s_scores, s_scores, kind, kind, dict(input_map or {}), reason)


def _no_scores(role: str, card: ModelCard) -> str:
    names = [t.name for t in card.outputs]
    wanted = f"scores_output {card.scores_output!r}" if card.scores_output else "a scores output"
    return (
        f"the {role} card has no {wanted} among its outputs {names} (name it in the card's "
        "scores_output)"
    )


def _scores_reason(
    student: ModelCard, teacher: ModelCard, s_scores: str | None, t_scores: str | None
) -> str | None:
    if s_scores is None:
        return _no_scores("student", student)
    if t_scores is None:
        return _no_scores("teacher", teacher)
    if (student.output_kind == "regression") != (teacher.output_kind == "regression"):
        return f"a {student.output_kind} student cannot follow a {teacher.output_kind} teacher"
    s_shape = _spec(student.outputs, s_scores).shape[1:]
    t_shape = _spec(teacher.outputs, t_scores).shape[1:]
    if not _compatible(s_shape, t_shape):
        if student.output_kind != "regression" and len(s_shape) == len(t_shape) == 1:
            return f"class counts differ: the student has {s_shape[0]}, the teacher {t_shape[0]}"
        return f"scores shapes differ: the student's {s_shape}, the teacher's {t_shape}"
    return None


def _inputs_reason(
    student: list[TensorSpec], teacher: list[TensorSpec], input_map: Mapping[str, str]
) -> str | None:
    unknown = sorted(set(input_map) - {t.name for t in student})
    if unknown:
        return f"input_map names inputs the student does not have: {unknown}"
    theirs = {t.name: t for t in teacher}
    fed = {input_map.get(t.name, t.name): t for t in student}
    missing = sorted(set(theirs) - set(fed))
    if missing:
        return f"the teacher needs inputs {missing} the student does not have (see input_map)"
    for name, mine in fed.items():
        other = theirs.get(name)
        if other is None:
            return f"the teacher has no input {name!r} (its inputs: {sorted(theirs)})"
        if other.datatype != mine.datatype:
            return (
                f"input {name!r}: the student takes {mine.datatype}, the teacher {other.datatype}"
            )
        if not _compatible(mine.shape, other.shape):
            return f"input {name!r}: the student's shape {mine.shape}, the teacher's {other.shape}"
    return None


def _spec(specs: list[TensorSpec], name: str) -> TensorSpec:
    return next(t for t in specs if t.name == name)


def _compatible(a: list[int], b: list[int]) -> bool:
    """Same rank, and every dimension equal or dynamic (-1) on either side."""
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))
