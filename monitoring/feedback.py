"""Recent predictions of one model, kept so that ground truth posted later can be joined to them.

`FeedbackStore(recorder, max_size=..., ttl_seconds=...)` holds, per request id, the student
version and scores and — when the request was shadowed — the teacher's scores, which the shadow
worker attaches later with `attach_teacher`. Scores are kept as the models output them (logits or
probabilities; "logits" below means either): the recorder reads each side as its `output_kind`
says, so a probabilities model is never softmaxed twice. A regression pair has no calibration:
its labels are joined and answered as usual, and the recorder records nothing for them.
`apply_feedback([{"id": ..., "label": ...}, ...])` records label-referenced calibration for the
student version and, where the teacher's output is known, for the teacher under `version="teacher"`
(`recorder.TEACHER_VERSION`), so accuracy and ECE of both against the same labels are PromQL ratios
of `kdgate_calibration_*_total{reference="label"}`.

Answer of `apply_feedback`: `{"accepted": n, "unknown": [ids], "expired": [ids],
"duplicate": [ids], "invalid": [ids]}` — none of them is an error:
- unknown: never stored here (or forgotten even as expired, see below);
- expired: stored once but no longer held, because it outlived `ttl_seconds` or was pushed out by
  `max_size` newer predictions; the store remembers up to `max_size` such ids;
- duplicate: a label for this id was already accepted;
- invalid: the label is not a class index in [0, C) (or a class label from `class_labels`), or a
  multi-row request did not get a list of one label per row.
If labels arrive before the teacher's output for a shadowed request, the student is recorded at
once and the teacher when `attach_teacher` delivers its logits. `on_labels(request_id, labels)`
(optional) is told every accepted label as well: a running rollout's paired window joins them
(monitoring/rollout_evidence.py).

Every operation is O(1) per id (expected), ~1.7 µs per prediction on a full store
(`python -m bench.feedback`), so `put_many` can run on the event loop. Not thread-safe:
use it from the event loop. The clock (seconds, monotonic) is injectable.

Layout: a full store of 50,000 single-row predictions of 10 classes costs ~18 MiB (tracemalloc),
where one Python object per prediction cost ~25 MiB, because it keeps no per-request objects:
- a single-row prediction of the store's class count occupies one row of preallocated float32
  arrays (student and teacher logits, [max_size + slack, C]) plus a few bytes of metadata in
  flat arrays (created time, version index, flags, age-order links);
- a multi-row request (or one of another width) takes one slot all the same, and its logits are
  kept as one copied array beside it: `max_size` counts requests, as it always has;
- ids are not kept: `monitoring.id_index.IdIndex` maps their 64-bit hash to the slot (half the
  18 MiB: a dict, chosen over a table in flat arrays that halves the memory and doubles the
  CPU the event loop pays per prediction), and
  tombstones are slots of a second pool holding just the hash and why the id left.
"""

from __future__ import annotations

import time
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kdgate.monitoring.id_index import IdIndex
from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder

# Live slots beyond `max_size`: a bulk `put_many` inserts first and evicts after, as a batch of
# up to this many predictions would without the bound (put_many comes in batches of ~64).
SLACK = 256

# Per-slot flags.
SHADOWED = 1  # the request was offered to the teacher
TEACHER = 2  # the teacher's logits are held
PENDING = 4  # labels were accepted and wait for the teacher's logits
INLINE = 8  # one row of the store's width, held in the preallocated arrays

# Why an id left the store (tombstone kinds).
EXPIRED = 0
LABELLED = 1


class _Slots:
    """`capacity` slots, each free or in use; those in use are linked oldest first."""

    def __init__(self, capacity: int) -> None:
        self._prev = array("i", [-1]) * capacity
        self._next = array("i", [-1]) * capacity
        self._free = array("i", range(capacity - 1, -1, -1))
        self.head = -1  # oldest slot in use, -1 if none
        self.tail = -1
        self.count = 0

    def take(self) -> int:
        """A free slot, now the newest in use; IndexError if none is free."""
        slot = self._free.pop()
        self._prev[slot] = self.tail
        self._next[slot] = -1
        if self.tail >= 0:
            self._next[self.tail] = slot
        else:
            self.head = slot
        self.tail = slot
        self.count += 1
        return slot

    def take_many(self, count: int) -> array[int]:
        """`count` free slots, now the newest in use, in the order `count` `take`s give them."""
        free = self._free
        slots = free[len(free) - count :]
        del free[len(free) - count :]
        slots.reverse()  # `take` pops from the end
        if count:
            self._append_run(slots)
        return slots

    def _append_run(self, slots: array[int]) -> None:
        """Link `slots` (not in use) after the tail, in order."""
        prev, nxt = self._prev, self._next
        last = self.tail
        if last < 0:
            self.head = last = slots[0]
            prev[last] = -1
            rest: Iterable[int] = slots[1:]
        else:
            rest = slots
        for slot in rest:
            prev[slot] = last
            nxt[last] = slot
            last = slot
        nxt[last] = -1
        self.tail = last
        self.count += len(slots)

    def oldest(self, count: int) -> array[int]:
        """The `count` oldest slots in use (at most `self.count`), oldest first."""
        found = array("i", [-1]) * count
        nxt, slot = self._next, self.head
        for i in range(count):
            found[i] = slot
            slot = nxt[slot]
        return found

    def release_oldest(self, run: array[int]) -> None:
        """`release` each slot of `run`, the oldest in use (`oldest(len(run))`), oldest first."""
        if not run:
            return
        rest = self._next[run[-1]]
        self.head = rest
        if rest >= 0:
            self._prev[rest] = -1
        else:
            self.tail = -1
        self._free.extend(run)
        self.count -= len(run)

    def renew_oldest_many(self, count: int) -> array[int]:
        """`renew_oldest` `count` times (`count` <= `self.count`): the oldest run, made newest."""
        run = self.oldest(count)
        if count and count < self.count:
            # The run is linked in order already: only its ends move.
            prev, nxt = self._prev, self._next
            first, last = run[0], run[-1]
            rest = nxt[last]
            self.head = rest
            prev[rest] = -1
            prev[first] = self.tail
            nxt[self.tail] = first
            nxt[last] = -1
            self.tail = last
        return run

    def release(self, slot: int) -> None:
        prev, next_ = self._prev[slot], self._next[slot]
        if prev >= 0:
            self._next[prev] = next_
        else:
            self.head = next_
        if next_ >= 0:
            self._prev[next_] = prev
        else:
            self.tail = prev
        self._free.append(slot)
        self.count -= 1

    def renew_oldest(self) -> int:
        """The oldest slot in use, made the newest (`release` + `take` of it, cheaper)."""
        return self.renew_oldest_many(1)[0]


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
        on_labels: Callable[[str, NDArray[np.int64]], None] | None = None,
    ) -> None:
        if max_size < 1 or ttl_seconds <= 0:
            raise ValueError("need max_size >= 1 and ttl_seconds > 0")
        self.recorder = recorder
        self._on_labels = on_labels
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self._class_index = {label: i for i, label in enumerate(class_labels or ())}
        self._clock = clock
        capacity = max_size + SLACK
        self._capacity = capacity
        self._live = _Slots(capacity)
        self._hash = array("q", bytes(8 * capacity))
        self._created = array("d", bytes(8 * capacity))
        self._version = array("i", bytes(4 * capacity))
        self._flags = array("B", bytes(capacity))
        # Row arrays for single-row predictions, [capacity, C]; with no class labels given, the
        # first single-row put fixes C.
        self._width = 0
        self._student = self._teacher = np.empty((0, 0), dtype=np.float32)
        self._other_student: dict[int, NDArray[np.float32]] = {}
        self._other_teacher: dict[int, NDArray[np.float32]] = {}
        self._pending: dict[int, NDArray[np.int64]] = {}
        self._versions: list[str] = []
        self._version_ids: dict[str, int] = {}
        # Tombstones: at most max_size, plus the one that pushes the oldest out.
        self._gone = _Slots(max_size + 1)
        self._gone_hash = array("q", bytes(8 * (max_size + 1)))
        self._gone_kind = array("B", bytes(max_size + 1))
        # Values < capacity are live slots; capacity + t is tombstone t.
        self._index = IdIndex(capacity + max_size + 1)
        # numpy views of the flat arrays (same memory), for the bulk path's scattered writes.
        self._hash_view = np.frombuffer(self._hash, dtype=np.int64)
        self._created_view = np.frombuffer(self._created, dtype=np.float64)
        self._version_view = np.frombuffer(self._version, dtype=np.int32)
        self._flags_view = np.frombuffer(self._flags, dtype=np.uint8)
        self._gone_hash_view = np.frombuffer(self._gone_hash, dtype=np.int64)
        self._gone_kind_view = np.frombuffer(self._gone_kind, dtype=np.uint8)
        if class_labels:
            self._allocate_rows(len(class_labels))

    def __len__(self) -> int:
        return self._live.count

    @property
    def tombstones(self) -> int:
        """How many ids are remembered as expired or labelled (at most `max_size`)."""
        return self._gone.count

    def put(
        self, request_id: str, version: str, student_logits: ArrayLike, *, shadowed: bool = False
    ) -> None:
        """Keep the prediction of `request_id` (logits [rows, C] or [C]); replaces an older one."""
        self.put_many([(request_id, version, student_logits, shadowed)])

    def put_many(self, predictions: Iterable[tuple[str, str, ArrayLike, bool]]) -> None:
        """`put` for each (request id, version, student logits, shadowed), oldest first."""
        request_ids, versions, logits, shadowed = tuple(zip(*predictions, strict=True)) or ((),) * 4
        self.put_columns(request_ids, versions, logits, shadowed)

    def put_columns(
        self,
        request_ids: Sequence[str],
        versions: Sequence[str],
        logits: Sequence[ArrayLike],
        shadowed: Sequence[bool] | None = None,
    ) -> None:
        """`put_many` with the predictions as columns, one entry per prediction in each (the
        request log's settle hands them over so); `shadowed` None: none was shadowed."""
        now = self._clock()
        if not self._put_usual(request_ids, versions, logits, shadowed, now):
            flags = shadowed if shadowed is not None else [False] * len(request_ids)
            self._put_each(zip(request_ids, versions, logits, flags, strict=True), now)
        self._evict(now)

    def _put_usual(
        self,
        request_ids: Sequence[str],
        versions: Sequence[str],
        logits: Sequence[ArrayLike],
        shadowed: Sequence[bool] | None,
        now: float,
    ) -> bool:
        """`_put_each` for the usual batch, array by array instead of row by row; False (and
        nothing done) when the batch is not one: each prediction a single row of the store's
        width, ids new to the store and distinct, room for all of them before eviction.

        On a full store of 50,000, 64 predictions: ~200 us row by row, ~105 us this way
        (`python -m bench.feedback`); the answers are the same (tests/unit/test_feedback.py
        checks both ways against one reference model).
        """
        count, width, live = len(request_ids), self._width, self._live
        if not count or not width or live.count + count > self._capacity:
            return False
        entries = self._index.entries
        keys = list(map(hash, request_ids))
        if (
            len(entries) + count > self._index.capacity
            or not entries.keys().isdisjoint(keys)
            or len(set(keys)) != count
            or set(map(type, logits)) != {np.ndarray}
        ):
            return False
        arrays = cast("Sequence[NDArray[Any]]", logits)
        if set(map(len, arrays)) != {1}:
            return False
        try:
            rows = np.concatenate(arrays)
        except ValueError:  # arrays of different ranks or widths
            return False
        if rows.shape != (count, width):
            return False
        slots = live.take_many(count)
        at = np.frombuffer(slots, dtype=np.int32)
        self._student[at] = rows
        self._flags_view[at] = (
            np.where(shadowed, INLINE | SHADOWED, INLINE)
            if shadowed is not None and any(shadowed)
            else INLINE
        )
        self._hash_view[at] = keys
        self._created_view[at] = now
        distinct = set(versions)
        if len(distinct) == 1:
            self._version_view[at] = self._version_id(distinct.pop())
        else:
            ids = {version: self._version_id(version) for version in distinct}
            self._version_view[at] = list(map(ids.__getitem__, versions))
        entries.update(zip(keys, slots, strict=True))
        return True

    def _put_each(self, batch: Iterable[tuple[str, str, ArrayLike, bool]], now: float) -> None:
        """`put` for each prediction of `batch`, one at a time (any batch)."""
        index, live, capacity = self._index, self._live, self._capacity
        flags, hashes, created, versions = self._flags, self._hash, self._created, self._version
        inline_slots: list[int] = []
        inline_rows: list[NDArray[np.float32]] = []
        for request_id, version, student_logits, shadowed in batch:
            if live.count == capacity:
                self._evict(now)
            slot = live.take()
            key = hash(request_id)
            previous = index.set(key, slot)
            if previous >= capacity:
                self._gone.release(previous - capacity)
            elif previous >= 0:
                self._free(previous)  # a newer prediction replaces it, at the young end
            logits = np.asarray(student_logits, dtype=np.float32)
            width = logits.shape[-1] if logits.ndim else 0
            if not self._width and width and logits.size == width:
                self._allocate_rows(width)  # the first single-row prediction fixes the width
            if width == self._width and logits.size == width:
                inline_slots.append(slot)
                inline_rows.append(logits.reshape(1, -1))
                flags[slot] = INLINE | SHADOWED if shadowed else INLINE
            else:
                # Copied, so a slice of a larger output does not keep that whole buffer alive.
                self._other_student[slot] = np.array(_as_rows(logits))
                flags[slot] = SHADOWED if shadowed else 0
            hashes[slot] = key
            created[slot] = now
            version_id = self._version_ids.get(version)
            versions[slot] = self._version_id(version) if version_id is None else version_id
        if inline_rows:
            self._student[inline_slots] = np.concatenate(inline_rows)

    def attach_teacher(self, request_id: str, teacher_logits: ArrayLike) -> None:
        """Attach the teacher's logits [rows, C] to a stored prediction; ignored if not held."""
        slot = self._index.get(hash(request_id))
        if not 0 <= slot < self._capacity:
            return
        logits = _as_rows(np.asarray(teacher_logits, dtype=np.float32))
        if logits.shape != self._shape(slot):
            return
        flags = self._flags[slot]
        if not flags & PENDING:
            if flags & INLINE:
                self._teacher[slot] = logits.reshape(-1)
            else:
                self._other_teacher[slot] = np.array(logits)
            self._flags[slot] = flags | TEACHER
            return
        self.recorder.record_labels(TEACHER_VERSION, logits, self._pending[slot])
        self._retire(slot, LABELLED)

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
        capacity = self._capacity
        for item in items:
            request_id = item.get("id")
            if not isinstance(request_id, str):
                answer["invalid"].append(request_id)
                continue
            code = self._index.get(hash(request_id))
            if 0 <= code < capacity and self._flags[code] & PENDING:
                answer["duplicate"].append(request_id)
                continue
            if 0 <= code < capacity and now - self._created[code] > self.ttl_seconds:
                self._retire(code, EXPIRED)
                code = self._index.get(hash(request_id))
            if not 0 <= code < capacity:
                status = "unknown"
                if code >= capacity:
                    kind = self._gone_kind[code - capacity]
                    status = "expired" if kind == EXPIRED else "duplicate"
                answer[status].append(request_id)
                continue
            slot = code
            labels = self._labels(item.get("label"), self._shape(slot))
            if labels is None:
                answer["invalid"].append(request_id)
                continue
            answer["accepted"] += 1
            if self._on_labels is not None:
                self._on_labels(request_id, labels)
            flags = self._flags[slot]
            # Views are safe: no slot is reused before `_record` below copies them.
            student[self._versions[self._version[slot]]].append((self._student_rows(slot), labels))
            if flags & TEACHER:
                teacher.append((self._teacher_rows(slot), labels))
            elif flags & SHADOWED:
                self._pending[slot] = labels  # the teacher's logits are still on their way
                self._flags[slot] = flags | PENDING
                continue
            self._retire(slot, LABELLED)
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

    def _allocate_rows(self, width: int) -> None:
        self._width = width
        self._student = np.zeros((self._capacity, width), dtype=np.float32)
        self._teacher = np.zeros((self._capacity, width), dtype=np.float32)

    def _version_id(self, version: str) -> int:
        version_id = self._version_ids.get(version)
        if version_id is None:
            version_id = self._version_ids[version] = len(self._versions)
            self._versions.append(version)
        return version_id

    def _shape(self, slot: int) -> tuple[int, ...]:
        if self._flags[slot] & INLINE:
            return (1, self._width)
        return self._other_student[slot].shape

    def _student_rows(self, slot: int) -> NDArray[np.float32]:
        if self._flags[slot] & INLINE:
            return self._student[slot : slot + 1]
        return self._other_student[slot]

    def _teacher_rows(self, slot: int) -> NDArray[np.float32]:
        if self._flags[slot] & INLINE:
            return self._teacher[slot : slot + 1]
        return self._other_teacher[slot]

    def _free(self, slot: int) -> None:
        """Release a live slot (its id stays in the index until the caller re-points it)."""
        self._live.release(slot)
        flags = self._flags[slot]
        if flags != INLINE and flags != INLINE | SHADOWED:  # the usual case has nothing aside
            self._free_aside(slot)

    def _free_aside(self, slot: int) -> None:
        """Drop what a slot keeps outside the flat arrays (rows of another shape, labels)."""
        flags = self._flags[slot]
        if not flags & INLINE:
            self._other_student.pop(slot, None)
            self._other_teacher.pop(slot, None)
        if flags & PENDING:
            self._pending.pop(slot, None)

    def _retire(self, slot: int, kind: int) -> None:
        key = self._hash[slot]
        self._free(slot)
        gone = self._gone
        if gone.count == self.max_size:
            # Full: the oldest tombstone is forgotten and its slot takes the new one.
            tomb = gone.renew_oldest()
            self._index.delete(self._gone_hash[tomb])
        else:
            tomb = gone.take()
        self._gone_hash[tomb] = key
        self._gone_kind[tomb] = kind
        self._index.set(key, self._capacity + tomb)

    def _evict(self, now: float) -> None:
        """Retire the predictions over `max_size` and those past `ttl_seconds`, oldest first."""
        # Age order is insertion order (put re-inserts at the young end): only the head can be due.
        live, created, nxt = self._live, self._created, self._live._next
        ttl = self.ttl_seconds
        over = max(live.count - self.max_size, 0)
        due = live.oldest(over)
        slot = nxt[due[-1]] if over else live.head
        while slot >= 0 and now - created[slot] > ttl:
            due.append(slot)
            slot = nxt[slot]
        if due:
            self._retire_oldest(due)

    def _retire_oldest(self, slots: array[int]) -> None:
        """`_retire` each of `slots`, the oldest live predictions, oldest first, in bulk."""
        live, gone, max_size = self._live, self._gone, self.max_size
        count = len(slots)
        taken = min(count, max_size - gone.count)
        renewed = count - taken
        if renewed > gone.count:  # more retire than tombstones are kept: a tiny store
            for slot in slots:
                self._retire(slot, LABELLED if self._flags[slot] & PENDING else EXPIRED)
            return
        at = np.frombuffer(slots, dtype=np.int32)
        flags = self._flags_view[at]
        unusual: NDArray[np.bool_] = (flags | SHADOWED) != INLINE | SHADOWED
        if unusual.any():  # rows kept aside, labels pending
            for slot in at[unusual].tolist():
                self._free_aside(slot)
        live.release_oldest(slots)
        kinds = (flags & PENDING) != 0  # LABELLED (1) where labels were pending, else EXPIRED
        keys = self._hash_view[at]
        entries = self._index.entries
        tombs = gone.take_many(taken)
        if renewed:
            oldest = gone.renew_oldest_many(renewed)
            for key in self._gone_hash_view[np.frombuffer(oldest, dtype=np.int32)].tolist():
                del entries[key]
            tombs.extend(oldest)
        where = np.frombuffer(tombs, dtype=np.int32)
        self._gone_hash_view[where] = keys
        self._gone_kind_view[where] = kinds
        entries.update(zip(keys.tolist(), (where + self._capacity).tolist(), strict=True))


def _as_rows(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    # A view, not a copy: [C] becomes [1, C].
    return logits if logits.ndim == 2 else logits.reshape(1, -1)
