"""What one model's drift compares: feature rows made from served requests, in bulk.

    features = DriftFeatures.for_signature(inputs, scores="logits", output_kind="logits",
                                           predictions="auto", projection=16)
    features.columns       # ["prediction", "confidence", "projection_0", ...]
    features.categorical   # ("prediction",)
    block = features.rows(inputs_of_requests, outputs_of_requests)   # [n, columns] float32

Three kinds of columns, chosen from the model's signature (`for_signature`):

- **inputs** — a table (one 2-D numeric input [N, D], D fixed): its D columns `input_0..`,
  cast to float32. Evidently compares each column, as for any tabular model.
- **predictions** — the student's predicted class (`prediction`, categorical) and its confidence
  (`confidence`, the top-1 probability: softmax of logits; probabilities as they are); for a
  regression output the predicted value(s) (`prediction`, or `prediction_0..`). Label-free and
  available for any model whatever its inputs look like (images, tokens, several inputs), so
  they are the default for every model that is not a table. A single-column classifier output
  is a binary classifier: sigmoid of the logit (or the probability as is) for class 1.
- **projection** — `k` fixed random directions of each row's inputs (optional): every input
  (BYTES excepted) flattened per row in the signature's order, cast to float32, zero-padded or
  cut to one width (the signature's, or the first rows seen when a dimension is dynamic, as
  for tokens of any length), times a Gaussian matrix drawn from `seed`. The same seed gives the
  same directions in every process and after a restart.

`rows` runs on the event loop for each settled batch of the request log: a few dictionary
lookups per request and one numpy operation per column kind for the whole batch. Requests whose
arrays do not fit the signature (another model's, a shape the signature does not allow) are
skipped, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt

Arrays = Mapping[str, Any]
Float32Array = npt.NDArray[np.float32]
OutputKind = Literal["logits", "probabilities", "regression"]
Predictions = Literal["auto", "always", "never"]


class InputSpec(NamedTuple):
    """One model input as drift sees it: name, V2 datatype, shape (-1 = dynamic)."""

    name: str
    datatype: str
    shape: Sequence[int]


def is_table(inputs: Sequence[InputSpec]) -> bool:
    """One numeric input of rank 2 with a fixed number of columns."""
    if len(inputs) != 1:
        return False
    (spec,) = inputs
    return len(spec.shape) == 2 and spec.shape[1] > 0 and spec.datatype != "BYTES"


class DriftFeatures:
    """The columns drift compares for one model, and how to make them from requests."""

    def __init__(
        self,
        *,
        table: InputSpec | None = None,
        scores: str | None = None,
        output_kind: OutputKind = "logits",
        score_columns: int = 0,
        projected: Sequence[InputSpec] = (),
        projection: int = 0,
        seed: int = 0,
    ) -> None:
        self.table = table
        self.scores = scores
        self.output_kind = output_kind
        self.projected = tuple(s for s in projected if s.datatype != "BYTES")
        self.dims = projection if self.projected else 0
        self.seed = seed
        columns: list[str] = []
        if table is not None:
            columns += [f"input_{i}" for i in range(table.shape[1])]
        self.categorical: tuple[str, ...] = ()
        self.predictions: list[str] = []  # the columns made from the scores output
        # Classes may be any number (None); regression values are columns, so their count is fixed.
        self._score_width = score_columns or (1 if output_kind == "regression" else None)
        if scores is not None:
            if output_kind != "regression":
                self.predictions, self.categorical = ["prediction", "confidence"], ("prediction",)
            elif score_columns > 1:
                self.predictions = [f"prediction_{i}" for i in range(score_columns)]
            else:
                self.predictions = ["prediction"]
        columns += self.predictions
        columns += [f"projection_{i}" for i in range(self.dims)]
        self.columns = columns
        self._width: int | None = _static_width(self.projected)
        self._matrix: Float32Array | None = None

    @classmethod
    def for_signature(
        cls,
        inputs: Sequence[InputSpec],
        *,
        scores: str | None,
        output_kind: OutputKind = "logits",
        score_columns: int = 0,
        predictions: Predictions = "auto",
        projection: int = 0,
        seed: int = 0,
    ) -> DriftFeatures:
        """Tables: their columns (+ predictions with `predictions="always"`). Any other
        signature: predictions (unless "never") and, with `projection` > 0, that many projected
        directions of the inputs. `scores`: the output holding the scores (None: no predictions).
        """
        table = inputs[0] if is_table(inputs) else None
        want_predictions = predictions == "always" or (predictions == "auto" and table is None)
        return cls(
            table=table,
            scores=scores if want_predictions else None,
            output_kind=output_kind,
            score_columns=score_columns,
            projected=() if table is not None else inputs,
            projection=projection,
            seed=seed,
        )

    def describe(self) -> str:
        """e.g. "64 input columns", "prediction, confidence + 16 projected directions"."""
        parts = []
        if self.table is not None:
            parts.append(f"{self.table.shape[1]} input columns")
        if self.predictions:
            parts.append(", ".join(self.predictions))
        if self.dims:
            parts.append(f"{self.dims} projected directions of the inputs")
        return " + ".join(parts) or "nothing"

    # -- making rows -------------------------------------------------------------------------

    def rows(
        self, inputs: Sequence[Arrays], outputs: Sequence[Arrays | None]
    ) -> Float32Array | None:
        """The feature rows of many requests (oldest first), [rows, columns] float32; None when
        no request fits. `outputs[i]` may be None when no column needs outputs."""
        usual = self._rows_usual(inputs, outputs)
        return usual if usual is not None else self._rows_each(inputs, outputs)

    def _rows_each(
        self, inputs: Sequence[Arrays], outputs: Sequence[Arrays | None]
    ) -> Float32Array | None:
        """`rows` of any batch: the requests that fit, checked one by one."""
        keep = [i for i in range(len(inputs)) if self._fits(inputs[i], outputs[i])]
        if not keep:
            return None
        parts: list[Float32Array] = []
        if self.table is not None:
            name = self.table.name
            parts.append(_stack([inputs[i][name] for i in keep]))
        if self.scores is not None:
            scores = _stack([_as_matrix(outputs[i][self.scores]) for i in keep])  # type: ignore[index]
            parts.append(self._from_scores(scores))
        if self.dims:
            parts.append(self._project([inputs[i] for i in keep]))
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def _rows_usual(
        self, inputs: Sequence[Arrays], outputs: Sequence[Arrays | None]
    ) -> Float32Array | None:
        """`rows` of a batch where every request fits, each column made once for the batch
        rather than request by request; None when some request does not fit (or the features
        project inputs): `_rows_each` then checks them one by one. Same rows either way
        (tests/unit/test_drift_features.py compares them); 64 digits requests: ~110 us one by
        one, ~40 us this way."""
        if self.dims or not inputs or (self.table is None and self.scores is None):
            return None
        parts: list[Float32Array] = []
        counts: list[int] | None = None
        try:
            if self.table is not None:
                tables = list(map(itemgetter(self.table.name), inputs))
                table = np.concatenate(tables)  # ValueError: ranks or widths differ
                if table.ndim != 2 or table.shape[1] != self.table.shape[1]:
                    return None
                counts = list(map(len, tables))
                parts.append(table.astype(np.float32, copy=False))
            if self.scores is not None:
                # TypeError: a request without outputs; KeyError: without the scores output.
                outputs_ = cast("Sequence[Arrays]", outputs)
                each = list(map(itemgetter(self.scores), outputs_))
                scores = np.concatenate(each)
                if scores.ndim not in (1, 2) or (
                    counts is not None and list(map(len, each)) != counts
                ):
                    return None
                width = 1 if scores.ndim == 1 else scores.shape[1]
                if self._score_width is not None and width != self._score_width:
                    return None
                matrix = _as_matrix(scores).astype(np.float32, copy=False)
                parts.append(self._from_scores(matrix))
        except (KeyError, TypeError, ValueError):
            return None
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def _fits(self, inputs: Arrays, outputs: Arrays | None) -> bool:
        n = -1
        if self.table is not None:
            rows = inputs.get(self.table.name)
            if rows is None or rows.ndim != 2 or rows.shape[1] != self.table.shape[1]:
                return False
            n = rows.shape[0]
        if self.scores is not None:
            scores = None if outputs is None else outputs.get(self.scores)
            if scores is None or scores.ndim not in (1, 2) or (n >= 0 and len(scores) != n):
                return False
            width = 1 if scores.ndim == 1 else scores.shape[1]
            if self._score_width is not None and width != self._score_width:
                return False
            n = len(scores)
        for spec in self.projected if self.dims else ():
            array = inputs.get(spec.name)
            if array is None or array.ndim < 1 or (n >= 0 and len(array) != n):
                return False
            n = len(array)
        return n >= 0

    def _from_scores(self, scores: Float32Array) -> Float32Array:
        if self.output_kind == "regression":
            return scores
        out = np.empty((len(scores), 2), np.float32)  # predicted class, confidence
        if scores.shape[1] == 1:  # one column: the score of class 1 of a binary classifier
            p1 = scores[:, 0]
            if self.output_kind == "logits":
                p1 = (1 / (1 + np.exp(-p1))).astype(np.float32)
            out[:, 0] = p1 >= 0.5
            np.maximum(p1, 1 - p1, out=out[:, 1])
            return out
        out[:, 0] = scores.argmax(1)
        top = scores.max(1, keepdims=True)
        if self.output_kind == "logits":
            # The top-1 softmax probability without forming the softmax: 1 / sum exp(l - max).
            np.divide(1, np.exp(scores - top).sum(1), out=out[:, 1])
        else:
            out[:, 1] = top[:, 0]
        return out

    def _project(self, requests: Sequence[Arrays]) -> Float32Array:
        columns: list[Float32Array] = []
        for spec in self.projected:
            arrays = [inputs[spec.name] for inputs in requests]
            if len({a.shape[1:] for a in arrays}) != 1:  # e.g. tokens of several lengths
                columns = []
                break
            joined = _stack(arrays)
            columns.append(joined.reshape(len(joined), -1))
        if columns:  # the usual batch: one stack per input
            flat = columns[0] if len(columns) == 1 else np.hstack(columns)
            if self._width is None:  # a dynamic dimension: the first rows seen fix the width
                self._width = flat.shape[1]
            flat = _fit_width(flat, self._width)
        else:  # row widths differ between requests: flatten and fit each request's rows
            per_request = [self._project_one(inputs) for inputs in requests]
            if self._width is None:
                self._width = per_request[0].shape[1]
            flat = _stack([_fit_width(f, self._width) for f in per_request])
        return (flat @ self._directions(self._width)).astype(np.float32, copy=False)

    def _project_one(self, inputs: Arrays) -> Float32Array:
        arrays = [inputs[s.name] for s in self.projected]
        n = len(arrays[0])
        flat = [np.asarray(a, dtype=np.float32).reshape(n, -1) for a in arrays]
        return flat[0] if len(flat) == 1 else np.hstack(flat)

    def _directions(self, width: int) -> Float32Array:
        if self._matrix is None:
            rng = np.random.default_rng(self.seed)
            # Scaled so a projection has the spread of one input value, whatever the width.
            self._matrix = (rng.standard_normal((width, self.dims)) / math.sqrt(width)).astype(
                np.float32
            )
        return self._matrix


def _static_width(inputs: Sequence[InputSpec]) -> int | None:
    width = 0
    for spec in inputs:
        dims = spec.shape[1:]
        if any(d < 0 for d in dims):
            return None
        width += math.prod(dims)
    return width or None


def _as_matrix(array: Any) -> Any:
    return array[:, None] if array.ndim == 1 else array


def _stack(arrays: Sequence[Any]) -> Float32Array:
    if len(arrays) == 1:
        return np.asarray(arrays[0], dtype=np.float32)  # no copy for a float32 array
    return np.concatenate(arrays).astype(np.float32, copy=False)


def _fit_width(rows: Float32Array, width: int) -> Float32Array:
    if rows.shape[1] == width:
        return rows
    if rows.shape[1] > width:
        return rows[:, :width]
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])))
