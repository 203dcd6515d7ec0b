"""Which student version serves a request: variants, weighted split, sticky keys.

A `Variant` is one loaded student version, built by the one factory of service/state.py
(`VariantFactory`), so a version loaded at start and one loaded through the admin API are alike.
A `Router` holds a model's variants and picks one per request: the version named in the URL if
any, else by the traffic weights, hashing the sticky header when the caller sends one so a
caller keeps its variant.

A Router never changes once built. A traffic change (service/traffic.py) builds a new Router and
assigns it to `ServingState.routers[model]` in one step, so a request sees the old split or the
new one, never half of each, and the request path takes no lock. `shadow_fraction` travels with
the Router for the same reason: the shadow decision reads `router.shadow_fraction`.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from kdgate.monitoring.metrics import Metrics
from kdgate.service.batching import Batcher, batchable
from kdgate.service.errors import ModelNotFound
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import TrafficSettings
from kdgate.service.tensors import Signature

_SLOTS = 100  # weights are percentages


class Variant:
    """One student version of a model, ready to run.

    `run` runs the student on decoded inputs: the session's own `run`, or the tracer's wrapper of
    it. When the signature allows and `batch_max_rows` > 1, concurrent requests share runs
    through a micro-batcher (service/batching.py).
    """

    def __init__(
        self,
        model: str,
        session: StudentSession,
        version: str,
        *,
        batch_max_rows: int = 1,
        run: Callable[[Any], Any] | None = None,
        metrics: Metrics | None = None,
    ):
        self.model = model
        self.version = version
        self.session = session
        self.run = run or session.run
        self.signature: Signature = session.signature
        self.batcher: Batcher | None = None
        if batch_max_rows > 1 and batchable(self.signature):
            self.batcher = (
                Batcher(
                    session,
                    batch_max_rows,
                    observe_rows=metrics.batch_rows.labels(model, version).observe,
                    observe_wait=metrics.batch_wait.labels(model, version).observe,
                )
                if metrics is not None
                else Batcher(session, batch_max_rows)
            )
        self.version_header = (b"x-kdgate-model-version", version.encode())


class Router:
    """A model's variants and the traffic split between them (immutable: replace, never edit)."""

    def __init__(
        self,
        model: str,
        variants: Mapping[str, Variant],
        weights: Mapping[str, int],
        sticky_header: str,
        shadow_fraction: float = 0.0,
    ) -> None:
        unknown = set(weights) - set(variants)
        if unknown or sum(weights.values()) != _SLOTS:
            raise ValueError(f"weights {dict(weights)} must sum to 100 over {list(variants)}")
        self.model = model
        self.variants = dict(variants)
        # Every variant has a weight (0 for those only reachable by an explicit version).
        self.weights = {version: int(weights.get(version, 0)) for version in self.variants}
        self.sticky_header = sticky_header.lower().encode()
        self.shadow_fraction = shadow_fraction
        # Slots follow the variants' order, not the order of `weights`: resending the same split
        # with its keys reordered moves no sticky caller, and with two versions, raising the
        # weight of the later (canary) one only moves callers to it, never away from it.
        self._slots: list[Variant] = [
            variant
            for version, variant in self.variants.items()
            for _ in range(self.weights[version])
        ]
        self._only = self._slots[0] if len(set(map(id, self._slots))) == 1 else None

    @classmethod
    def from_traffic(
        cls, model: str, variants: Mapping[str, Variant], traffic: TrafficSettings
    ) -> Router:
        """A router for a model's `traffic` settings (weights, sticky header, shadow fraction)."""
        return cls(model, variants, traffic.weights, traffic.sticky_header, traffic.shadow_fraction)

    @property
    def traffic(self) -> TrafficSettings:
        """The split this router applies, as the model's `traffic` object (all versions listed)."""
        return TrafficSettings(
            weights=self.weights,
            sticky_header=self.sticky_header.decode(),
            shadow_fraction=self.shadow_fraction,
        )

    @property
    def signature(self) -> Signature:
        return next(iter(self.variants.values())).signature

    @property
    def default(self) -> Variant:
        """The variant with the largest share (the one metadata describes)."""
        return self.variants[max(self.weights, key=self.weights.__getitem__)]

    def get(self, version: str) -> Variant:
        """The variant for an explicit version (bypasses the split)."""
        variant = self.variants.get(version)
        if variant is None:
            raise ModelNotFound(
                f"model {self.model!r} has no version {version!r}; versions: {list(self.variants)}"
            )
        return variant

    def pick(self, sticky_key: bytes | None) -> Variant:
        """A variant by weight; the same sticky key always gets the same variant."""
        if self._only is not None:
            return self._only
        if sticky_key:
            return self._slots[zlib.crc32(sticky_key) % _SLOTS]
        return self._slots[int(random.random() * _SLOTS)]
