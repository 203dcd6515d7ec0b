"""A fixed-capacity map from request ids to small integers, without keeping the ids.

`IdIndex(capacity)` maps the 64-bit `hash()` of an id string to an int in [0, 2**31). It holds
two flat arrays (open addressing, linear probing, deletion by backward shift), so 100,000 entries
cost ~2.4 MiB where a `dict[str, int]` of uuid ids costs ~15 MiB (the strings dominate).

Two ids are told apart by their 64-bit hash only. Python's string hash is SipHash with a
per-process key, so a false match among the ~10**5 ids held has a chance of ~10**-9 per lookup:
acceptable for joining feedback labels, not for anything security-relevant.
"""

from __future__ import annotations

from array import array

EMPTY = -1


class IdIndex:
    """At most `capacity` entries `hash(id) -> value` (values >= 0); O(1) expected per operation."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("need capacity >= 1")
        # Load factor <= 1/2 keeps linear probing at ~1.5 probes for a hit, ~2.5 for a miss.
        self._size = 2 * capacity + 1
        self._keys = array("q", bytes(8 * self._size))
        self._values = array("i", [EMPTY]) * self._size
        self._count = 0
        self.capacity = capacity

    def __len__(self) -> int:
        return self._count

    def get(self, key: int) -> int:
        """The value stored for `key`, or -1."""
        keys, values, size = self._keys, self._values, self._size
        i = key % size
        while True:
            value = values[i]
            if value == EMPTY or keys[i] == key:
                return value
            i += 1
            if i == size:
                i = 0

    def set(self, key: int, value: int) -> int:
        """Store `value` (>= 0) for `key`; return the value it replaces, or -1."""
        keys, values, size = self._keys, self._values, self._size
        i = key % size
        while True:
            previous = values[i]
            if previous == EMPTY:
                if self._count == self.capacity:
                    raise OverflowError("IdIndex is full")
                self._count += 1
                keys[i] = key
                break
            if keys[i] == key:
                break
            i += 1
            if i == size:
                i = 0
        values[i] = value
        return previous

    def delete(self, key: int) -> None:
        """Forget `key` (no-op if absent)."""
        keys, values, size = self._keys, self._values, self._size
        i = key % size
        while True:
            if values[i] == EMPTY:
                return
            if keys[i] == key:
                break
            i += 1
            if i == size:
                i = 0
        self._count -= 1
        # Backward shift: move later entries of the same probe run into the hole, so lookups
        # never need "deleted" markers and the table never fills with them.
        j = i
        while True:
            j += 1
            if j == size:
                j = 0
            if values[j] == EMPTY:
                break
            home = keys[j] % size
            # The entry at j may move to i unless its home lies cyclically in (i, j].
            if (i < j and i < home <= j) or (j < i and (home > i or home <= j)):
                continue
            keys[i] = keys[j]
            values[i] = values[j]
            i = j
        values[i] = EMPTY
