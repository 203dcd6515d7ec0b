"""The feedback store's semantics as first written, to check the compact one against.

One `Prediction` object per request in an `OrderedDict` (age order), tombstones in a second one:
the simplest model of `kdgate.monitoring.feedback.FeedbackStore`'s documented behaviour.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kdgate.monitoring.recorder import TEACHER_VERSION

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


class ReferenceFeedbackStore:
    """The store as one Python object per prediction in OrderedDicts: slow, big, obviously right."""

    def __init__(
        self,
        recorder: Any,
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
