"""A circuit breaker, so a failing teacher stops being called and is probed later.

    closed --(failure_threshold consecutive failures)--> open
    open --(cooldown_seconds elapsed; allow() lets one probe through)--> half_open
    half_open --(probe succeeds)--> closed
    half_open --(probe fails)--> open (the cool-down starts again)

Usage: `if breaker.allow(): try call; breaker.record_success() / record_failure()`. While
half-open only the probe is allowed; a probe that never reports back (cancelled) is replaced by a
new one after another cool-down, so the breaker cannot stay stuck half-open. The clock is
injectable (seconds, monotonic). Not thread-safe: use it from the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; probes after `cooldown_seconds`."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cooldown_seconds < 0:
            raise ValueError("need failure_threshold >= 1 and cooldown_seconds >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._since = 0.0  # when the breaker opened, or when the current probe started

    @property
    def state(self) -> State:
        """ "closed", "open" or "half_open" (as of the last call to allow or record_*)."""
        return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now. In open state after the cool-down, this turns the
        breaker half-open and admits exactly one probe."""
        if self._state == "closed":
            return True
        if self._clock() - self._since < self.cooldown_seconds:
            return False
        self._state = "half_open"
        self._since = self._clock()
        return True

    def record_success(self) -> None:
        """The call went through: close the breaker and forget past failures."""
        self._state = "closed"
        self._failures = 0

    def record_failure(self) -> None:
        """The call failed: count it, and open the breaker at the threshold or on a failed probe."""
        self._failures += 1
        if self._state == "half_open" or self._failures >= self.failure_threshold:
            self._state = "open"
            self._since = self._clock()
