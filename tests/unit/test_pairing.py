"""service/pairing.py: which pairs are compared, through which outputs, and why not."""

from __future__ import annotations

from typing import Any

import pytest

from kdgate.service.cards import ModelCard, TensorSpec
from kdgate.service.pairing import pair_cards, pair_remote


def card(
    inputs: list[tuple[str, str, list[int]]] | None = None,
    outputs: list[tuple[str, list[int]]] | None = None,
    **fields: Any,
) -> ModelCard:
    return ModelCard(
        name="m",
        role="student",
        version="1",
        file="m.onnx",
        sha256="0" * 64,
        bytes=1,
        inputs=[
            TensorSpec(name=n, datatype=d, shape=s)  # type: ignore[arg-type]
            for n, d, s in inputs or [("input_ids", "INT64", [-1, 8]), ("mask", "INT64", [-1, 8])]
        ],
        outputs=[
            TensorSpec(name=n, datatype="FP32", shape=s)
            for n, s in outputs or [("logits", [-1, 3])]
        ],
        **fields,
    )


def test_a_matching_pair_is_compared_through_each_sides_scores_output() -> None:
    sklearn_teacher = card(
        outputs=[("label", [-1]), ("probabilities", [-1, 3])], output_kind="probabilities"
    )
    pairing = pair_cards(card(), sklearn_teacher)
    assert pairing.comparable
    assert (pairing.student_scores, pairing.teacher_scores) == ("logits", "probabilities")
    assert (pairing.student_kind, pairing.teacher_kind) == ("logits", "probabilities")


def test_input_map_renames_the_students_inputs_for_the_teacher() -> None:
    teacher = card(inputs=[("ids", "INT64", [-1, -1]), ("attention", "INT64", [-1, 8])])
    assert not pair_cards(card(), teacher).comparable
    pairing = pair_cards(card(), teacher, {"input_ids": "ids", "mask": "attention"})
    assert pairing.comparable and pairing.input_map == {"input_ids": "ids", "mask": "attention"}


@pytest.mark.parametrize(
    ("student", "teacher", "input_map", "reason"),
    [
        (card(), card(outputs=[("logits", [-1, 4])]), None, "class counts differ"),
        (card(outputs=[("a", [-1, 3]), ("b", [-1, 3])]), card(), None, "student card has no"),
        (card(), card(scores_output="nope"), None, "teacher card has no scores_output 'nope'"),
        (card(), card(outputs=[("value", [-1, 1])], output_kind="regression"), None, "follow"),
        (card(), card(inputs=[("input_ids", "INT64", [-1, 8])]), None, "no input 'mask'"),
        (
            card(),
            card(inputs=[("input_ids", "INT32", [-1, 8]), ("mask", "INT64", [-1, 8])]),
            None,
            "INT32",
        ),
        (
            card(),
            card(inputs=[("input_ids", "INT64", [-1, 9]), ("mask", "INT64", [-1, 8])]),
            None,
            "shape",
        ),
        (card(), card(), {"token_type_ids": "x"}, "input_map names inputs"),
        (
            card(class_labels=["a", "b", "c"]),
            card(class_labels=["a", "c", "b"]),
            None,
            "class labels",
        ),
    ],
)
def test_pairs_that_cannot_be_compared_say_why(
    student: ModelCard, teacher: ModelCard, input_map: dict[str, str] | None, reason: str
) -> None:
    pairing = pair_cards(student, teacher, input_map)
    assert not pairing.comparable
    assert pairing.reason is not None and reason in pairing.reason


def test_a_remote_teacher_is_asked_for_the_students_scores_output() -> None:
    pairing = pair_remote(card(outputs=[("label", [-1]), ("probabilities", [-1, 3])]))
    assert pairing.comparable and pairing.teacher_scores == "probabilities"
    assert not pair_remote(card(outputs=[("a", [-1]), ("b", [-1])])).comparable
