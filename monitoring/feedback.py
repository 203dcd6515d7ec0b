"""Recent predictions of one model, kept so that ground truth posted later can be joined to them.

`FeedbackStore(recorder, max_size=..., ttl_seconds=...)` holds, per request id, the student
version and logits and — when the request was shadowed — the teacher's logits, which the shadow
worker attaches later with `attach_teacher`. `apply_feedback([{"id": ..., "label": ...}, ...])`
records label-referenced calibration for the student version and, where the teacher's output is
known, for the teacher under `version="teacher"` (`recorder.TEACHER_VERSION`), so accuracy and
ECE of both against the same labels are PromQL ratios of
`kdgate_calibration_*_total{reference="label"}`.

Answer of `apply_feedback`: `{"accepted": n, "unknown": [ids], "expired": [ids],
"duplicate": [ids], "invalid": [ids]}` — none of them is an error:
- unknown: never stored here (or forgotten even as expired, see below);
- expired: stored once but no longer held, because it outlived `ttl_seconds` or was pushed out by
  `max_size` newer predictions; the store remembers up to `max_size` such ids;
- duplicate: a label for this id was already accepted;
- invalid: the label is not a class index in [0, C) (or a class label from `class_labels`), or a
  multi-row request did not get a list of one label per row.
If labels arrive before the teacher's output for a shadowed request, the student is recorded at
once and the teacher when `attach_teacher` delivers its logits.

Every operation is O(1) per id (amortised), so `put` can run on the hot path. Not thread-safe:
use it from the event loop. The clock (seconds, monotonic) is injectable.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder

Tombstone = Literal["expired", "labelled"]


@dataclass(slots=True)
class Prediction:
    """What was answered for one request: `student_logits` [rows, C] of `version`."""

    version: str
    student_logits: NDArray[np.float32]
    created: float
    shadowed: bool
    teacher_logits: NDArray[np.float32] | None = None
    labels: NDArray[np.int64] | None = None  # accepted, waiting for the teacher's logits


class FeedbackStore:
    """At most `max_size` recent predictions, each usable for `ttl_seconds` (see module doc)."""

    def __init__(
        self,
        recorder: FidelityRecorder,
        *,
        max_size: int = 50_000,
        ttl_seconds: float = 3600.0,
        class_labels: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1 or ttl_seconds <= 0:
            raise ValueError("need max_size >= 1 and ttl_seconds > 0")
        self.recorder = recorder
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self._class_index = {label: i for i, label in enumerate(class_labels or ())}
        self._clock = clock
        self._live: OrderedDict[str, Prediction] = OrderedDict()
        self._gone: OrderedDict[str, Tombstone] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def put(
        self, request_id: str, version: str, student_logits: ArrayLike, *, shadowed: bool = False
    ) -> None:
        """Keep the prediction of `request_id` (logits [rows, C] or [C]); replaces an older one.

        The logits are kept as given, not copied (a copy costs ~1 us): don't modify them later.
        """
        self.put_many([(request_id, version, student_logits, shadowed)])

    def put_many(self, predictions: Iterable[tuple[str, str, ArrayLike, bool]]) -> None:
        """`put` for each (request id, version, student logits, shadowed), oldest first."""
        now = self._clock()
        live, gone = self._live, self._gone
        for request_id, version, student_logits, shadowed in predictions:
            logits = np.asarray(student_logits, dtype=np.float32)
            if request_id in live:
                del live[request_id]  # re-inserted at the end: insertion order is age order
            if gone:
                gone.pop(request_id, None)
            live[request_id] = Prediction(version, _as_rows(logits), now, shadowed)
        self._evict(now)

    def attach_teacher(self, request_id: str, teacher_logits: ArrayLike) -> None:
        """Attach the teacher's logits [rows, C] to a stored prediction; ignored if not held."""
        entry = self._live.get(request_id)
        if entry is None:
            return
        logits = _as_rows(np.asarray(teacher_logits, dtype=np.float32))
        if logits.shape != entry.student_logits.shape:
            return
        if entry.labels is None:
            entry.teacher_logits = logits
            return
        self.recorder.record_labels(TEACHER_VERSION, logits, entry.labels)
        self._retire(request_id, "labelled")

    def apply_feedback(self, items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Join labels to stored predictions and record them; see the module docstring."""
        now = self._clock()
        self._evict(now)
        answer: dict[str, Any] = {
            "accepted": 0,
            "unknown": [],
            "expired": [],
            "duplicate": [],
            "invalid": [],
        }
        student: defaultdict[str, list[tuple[NDArray[np.float32], NDArray[np.int64]]]]
        student = defaultdict(list)
        teacher: list[tuple[NDArray[np.float32], NDArray[np.int64]]] = []
        for item in items:
            request_id = item.get("id")
            if not isinstance(request_id, str):
                answer["invalid"].append(request_id)
                continue
            entry = self._live.get(request_id)
            if entry is not None and entry.labels is not None:
                answer["duplicate"].append(request_id)
                continue
            if entry is not None and now - entry.created > self.ttl_seconds:
                self._retire(request_id, "expired")
                entry = None
            if entry is None:
                gone = self._gone.get(request_id)
                status = {"expired": "expired", "labelled": "duplicate"}.get(gone or "", "unknown")
                answer[status].append(request_id)
                continue
            labels = self._labels(item.get("label"), entry.student_logits.shape)
            if labels is None:
                answer["invalid"].append(request_id)
                continue
            answer["accepted"] += 1
            student[entry.version].append((entry.student_logits, labels))
            if entry.teacher_logits is not None:
                teacher.append((entry.teacher_logits, labels))
            if entry.shadowed and entry.teacher_logits is None:
                entry.labels = labels  # the teacher's logits are still on their way
            else:
                self._retire(request_id, "labelled")
        for version, pairs in student.items():
            self._record(version, pairs)
        if teacher:
            self._record(TEACHER_VERSION, teacher)
        return answer

    def _record(
        self, version: str, pairs: list[tuple[NDArray[np.float32], NDArray[np.int64]]]
    ) -> None:
        logits = np.concatenate([p[0] for p in pairs])
        labels = np.concatenate([p[1] for p in pairs])
        self.recorder.record_labels(version, logits, labels)

    def _labels(self, label: Any, shape: tuple[int, ...]) -> NDArray[np.int64] | None:
        rows, classes = shape
        values = label if isinstance(label, list) else [label]
        if len(values) != rows:
            return None
        out = np.empty(rows, dtype=np.int64)
        for i, value in enumerate(values):
            if isinstance(value, str) and value in self._class_index:
                out[i] = self._class_index[value]
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < classes:
                out[i] = value
            else:
                return None
        return out

    def _retire(self, request_id: str, why: Tombstone) -> None:
        self._live.pop(request_id, None)
        self._gone[request_id] = why
        self._gone.move_to_end(request_id)
        if len(self._gone) > self.max_size:
            self._gone.popitem(last=False)

    def _evict(self, now: float) -> None:
        # Insertion order is age order (put re-inserts), so only the front can be due.
        while self._live:
            request_id, oldest = next(iter(self._live.items()))
            if len(self._live) <= self.max_size and now - oldest.created <= self.ttl_seconds:
                break
            self._retire(request_id, "expired" if oldest.labels is None else "labelled")


def _as_rows(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    # A view, not a copy: [C] becomes [1, C].
    return logits if logits.ndim == 2 else logits.reshape(1, -1)
