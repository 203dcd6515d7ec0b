"""A fixed-capacity map from request ids to small integers, without keeping the ids.

`IdIndex(capacity)` maps the 64-bit `hash()` of an id string to an int in [0, 2**31). Keyed by
the hash, not the id, it holds no strings: a `dict[int, int]` of 100,000 entries costs ~9 MiB
where one keyed by uuid strings costs ~15 MiB. An open-addressing table in two flat arrays
would cost ~2.4 MiB but runs in Python: measured here, 3x the CPU per prediction stored on the
event loop (`python -m bench.feedback`), for memory the RSS budget does not need.

Two ids are told apart by their 64-bit hash only. Python's string hash is SipHash with a
per-process key, so a false match among the ~10**5 ids held has a chance of ~10**-9 per lookup:
acceptable for joining feedback labels, not for anything security-relevant.
"""

from __future__ import annotations

EMPTY = -1


class IdIndex:
    """At most `capacity` entries `hash(id) -> value` (values >= 0); O(1) per operation."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("need capacity >= 1")
        # Public for bulk callers (`dict.update`, `keys().isdisjoint`), who keep the capacity.
        self.entries: dict[int, int] = {}
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: int) -> int:
        """The value stored for `key`, or -1."""
        return self.entries.get(key, EMPTY)

    def set(self, key: int, value: int) -> int:
        """Store `value` (>= 0) for `key`; return the value it replaces, or -1."""
        entries = self.entries
        previous = entries.get(key, EMPTY)
        if previous == EMPTY and len(entries) == self.capacity:
            raise OverflowError("IdIndex is full")
        entries[key] = value
        return previous

    def delete(self, key: int) -> None:
        """Forget `key` (no-op if absent)."""
        self.entries.pop(key, None)
