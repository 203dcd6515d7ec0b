"""What drift compares (monitoring/drift_features.py): columns per signature, predictions against
scipy, the seeded projection against plain numpy, and Evidently's prediction scores against
independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, rel_entr, softmax
from scipy.stats import wasserstein_distance

from kdgate.monitoring.drift import evidently_drift, numpy_drift, psi
from kdgate.monitoring.drift_features import DriftFeatures, InputSpec
from tests.support.drift_models import (
    image_batch,
    image_probabilities,
    token_batch,
    token_logits,
)

TOKENS = [InputSpec("input_ids", "INT64", [-1, -1]), InputSpec("attention_mask", "INT64", [-1, -1])]
IMAGE = [InputSpec("image", "FP32", [-1, 1, 8, 8])]
TABLE = [InputSpec("x", "INT32", [-1, 3])]


def token_features(**options: object) -> DriftFeatures:
    return DriftFeatures.for_signature(
        TOKENS, scores="logits", output_kind="logits", score_columns=3, **options
    )


def test_columns_follow_the_signature() -> None:
    table = DriftFeatures.for_signature(TABLE, scores="logits", output_kind="logits")
    assert table.columns == ["input_0", "input_1", "input_2"] and table.categorical == ()
    both = DriftFeatures.for_signature(TABLE, scores="logits", predictions="always")
    assert both.columns[-2:] == ["prediction", "confidence"]
    assert token_features().columns == ["prediction", "confidence"]
    assert token_features().categorical == ("prediction",)
    projected = token_features(projection=4)
    assert projected.columns == ["prediction", "confidence"] + [f"projection_{i}" for i in range(4)]
    assert token_features(predictions="never").columns == []
    regression = DriftFeatures.for_signature(
        IMAGE, scores="value", output_kind="regression", score_columns=2
    )
    assert regression.columns == ["prediction_0", "prediction_1"] and regression.categorical == ()
    # A table with a dynamic width is not a table: predictions instead.
    wide = DriftFeatures.for_signature([InputSpec("x", "FP32", [-1, -1])], scores="logits")
    assert wide.columns == ["prediction", "confidence"]


def test_predictions_from_logits_match_scipy() -> None:
    rng = np.random.default_rng(0)
    batches = [token_batch(rng, n) for n in (1, 4, 7)]
    logits = [token_logits(**b) for b in batches]
    rows = token_features().rows(batches, [{"logits": x} for x in logits])
    assert rows is not None and rows.dtype == np.float32 and rows.shape == (12, 2)
    every = np.concatenate(logits)
    np.testing.assert_array_equal(rows[:, 0], every.argmax(1))
    np.testing.assert_allclose(rows[:, 1], softmax(every.astype(np.float64), 1).max(1), rtol=1e-6)


def test_probabilities_are_taken_as_they_are() -> None:
    features = DriftFeatures.for_signature(
        IMAGE, scores="probabilities", output_kind="probabilities", score_columns=4
    )
    batch = image_batch(np.random.default_rng(1), 5)
    probabilities = image_probabilities(batch["image"])
    rows = features.rows([batch], [{"probabilities": probabilities}])
    assert rows is not None
    np.testing.assert_array_equal(rows[:, 0], probabilities.argmax(1))
    np.testing.assert_array_equal(rows[:, 1], probabilities.max(1))


def test_one_score_column_is_a_binary_classifier() -> None:
    logit = np.array([[-2.0], [0.5], [3.0]], np.float32)
    features = DriftFeatures.for_signature(TABLE, scores="y", predictions="always")
    rows = features.rows([{"x": np.zeros((3, 3), np.int32)}], [{"y": logit}])
    assert rows is not None
    p1 = expit(logit[:, 0].astype(np.float64))
    np.testing.assert_array_equal(rows[:, 3], [0, 1, 1])
    np.testing.assert_allclose(rows[:, 4], np.maximum(p1, 1 - p1), rtol=1e-6)


def test_regression_values_are_the_columns() -> None:
    features = DriftFeatures.for_signature(IMAGE, scores="value", output_kind="regression")
    values = np.array([1.5, -2.0], np.float32)
    rows = features.rows([image_batch(np.random.default_rng(2), 2)], [{"value": values}])
    assert rows is not None and rows[:, 0].tolist() == [1.5, -2.0]


def test_the_projection_is_seeded_padded_and_plain_matrix_maths() -> None:
    rng = np.random.default_rng(3)
    short, long = token_batch(rng, 3), token_batch(rng, 2)
    long = {k: np.hstack([v, v[:, :4]]) for k, v in long.items()}  # 16 tokens, not 12
    scores = [{"logits": token_logits(**b)} for b in (short, long)]
    a = token_features(projection=5, seed=7)
    rows = a.rows([short, long], scores)
    assert rows is not None and rows.shape == (5, 7)
    # By hand: ids then mask, flattened per row; the first rows fix the width (24), so the
    # longer rows are cut to it; a Gaussian matrix from the seed, scaled by 1/sqrt(width).
    flat = np.vstack(
        [
            np.hstack([short["input_ids"], short["attention_mask"]]),
            np.hstack([long["input_ids"], long["attention_mask"]])[:, :24],
        ]
    ).astype(np.float64)
    matrix = np.random.default_rng(7).standard_normal((24, 5)) / np.sqrt(24)
    np.testing.assert_allclose(rows[:, 2:], flat @ matrix, rtol=1e-4, atol=1e-4)
    # Padding: shorter rows than the width get zeros.
    again = token_features(projection=5, seed=7)
    assert again.rows([long], scores[1:]) is not None  # width 32 now
    padded = again.rows([short], scores[:1])
    assert padded is not None
    full = np.hstack([short["input_ids"], short["attention_mask"]]).astype(np.float64)
    wide = np.random.default_rng(7).standard_normal((32, 5)) / np.sqrt(32)
    np.testing.assert_allclose(padded[:, 2:], full @ wide[:24], rtol=1e-4, atol=1e-4)
    # Same seed, same directions, in another instance (another process, after a restart).
    same = token_features(projection=5, seed=7).rows([short, long], scores)
    assert same is not None
    np.testing.assert_array_equal(same, rows)


def test_requests_that_do_not_fit_are_skipped() -> None:
    features = token_features()
    good = token_batch(np.random.default_rng(4), 2)
    rows = features.rows(
        [good, {"other": np.zeros((2, 3))}, good, good],
        [
            {"logits": token_logits(**good)},
            {"logits": np.zeros((2, 3), np.float32)},  # inputs fine for no column: still kept
            {"logits": np.zeros((2, 5), np.float32)},  # 5 classes, not 3
            None,  # no outputs
        ],
    )
    assert rows is not None and len(rows) == 4
    assert features.rows([good], [None]) is None


def independent_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of a categorical column from scipy: (p - q) ln(p / q) = rel_entr(p, q) +
    rel_entr(q, p), with Evidently's filler 1e-4 for empty cells."""
    cells = np.union1d(reference, current)
    p = np.array([(reference == c).mean() for c in cells])
    q = np.array([(current == c).mean() for c in cells])
    p, q = np.where(p == 0, 1e-4, p), np.where(q == 0, 1e-4, q)
    return float(rel_entr(p, q).sum() + rel_entr(q, p).sum())


def token_rows(rng: np.random.Generator, n: int, *, shifted: bool = False) -> np.ndarray:
    batch = token_batch(rng, n, shifted=shifted)
    rows = token_features().rows([batch], [{"logits": token_logits(**batch)}])
    assert rows is not None
    return rows


@pytest.mark.parametrize("shifted", [False, True])
def test_evidently_scores_predictions_as_scipy_does(shifted: bool) -> None:
    """Predicted class: PSI; confidence: Wasserstein distance / reference std (both Evidently's
    definitions), recomputed here from the same arrays with scipy."""
    rng = np.random.default_rng(5)
    reference = token_rows(rng, 500)
    current = token_rows(rng, 800, shifted=shifted)
    features = token_features()
    result = evidently_drift(
        current,
        reference,
        html=False,
        columns=features.columns,
        categorical=features.categorical,
        scored=features.predictions,
    )
    ref, cur = reference.astype(np.float64), current.astype(np.float64)
    expected_psi = independent_psi(ref[:, 0], cur[:, 0])
    expected_wasserstein = wasserstein_distance(ref[:, 1], cur[:, 1]) / np.std(ref[:, 1])
    assert result.scores["prediction"] == pytest.approx(expected_psi, rel=1e-6)
    assert result.scores["confidence"] == pytest.approx(expected_wasserstein, rel=1e-4)
    assert psi(ref[:, 0], cur[:, 0], categorical=True) == pytest.approx(expected_psi, rel=1e-9)
    if shifted:  # the new topic moves both: every column drifted
        assert expected_psi > 0.1 and expected_wasserstein > 0.1 and result.share == 1.0
    else:
        assert expected_psi < 0.05 and expected_wasserstein < 0.08 and result.share == 0.0
    fallback = numpy_drift(
        current, reference, columns=features.columns, categorical=("prediction",)
    )
    assert fallback.scores["prediction"] == pytest.approx(expected_psi, rel=1e-9)


# One request's arrays for a table-and-scores model (3 input columns, 2 classes): usually fitting,
# sometimes of another rank, width or row count, without the input, or without outputs.
REQUEST_SHAPES = st.sampled_from(
    ["fits", "fits", "fits", "one-row-1d", "wide", "3d", "no-input", "no-outputs", "rows-differ"]
)


def table_request(kind: str, rows: int, seed: int) -> tuple[dict, dict | None]:
    rng = np.random.default_rng(seed)
    rows = max(rows, 1) if kind == "one-row-1d" else rows
    table = rng.integers(-5, 5, size=(rows, 3)).astype(np.int32)
    scores = rng.normal(size=(rows, 2)).astype(np.float32)
    if kind == "one-row-1d":
        return {"x": table[0]}, {"y": scores[0]}
    if kind == "wide":
        return {"x": rng.integers(0, 2, size=(rows, 4)).astype(np.int32)}, {"y": scores}
    if kind == "3d":
        return {"x": table[:, None, :]}, {"y": scores}
    if kind == "no-input":
        return {"other": table}, {"y": scores}
    if kind == "no-outputs":
        return {"x": table}, None
    if kind == "rows-differ":
        return {"x": table}, {"y": np.concatenate([scores, scores])}
    return {"x": table}, {"y": scores}


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(
        st.tuples(REQUEST_SHAPES, st.integers(0, 3), st.integers(0, 2**16)), max_size=8
    ),
    kind=st.sampled_from(["logits", "probabilities", "regression"]),
)
def test_a_batch_gives_the_rows_its_requests_give_one_by_one(
    requests: list[tuple[str, int, int]], kind: str
) -> None:
    features = DriftFeatures.for_signature(
        TABLE, scores="y", output_kind=kind, score_columns=2 if kind == "regression" else 0
    )
    made = [table_request(*request) for request in requests]
    inputs, outputs = [m[0] for m in made], [m[1] for m in made]
    together = features.rows(inputs, outputs)
    one_by_one = features._rows_each(inputs, outputs)
    if one_by_one is None:
        assert together is None
    else:
        assert together is not None and together.dtype == np.float32
        np.testing.assert_array_equal(together, one_by_one)
