"""Which student version serves a request: variants, weighted split, sticky keys.

A `Variant` is one loaded student version with its metric children pre-bound (`.labels()` on
every request costs more than the counter increment itself). A `Router` holds a model's variants
and picks one per request: the version named in the URL if any, else by the traffic weights,
hashing the sticky header when the caller sends one so a caller keeps its variant.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping

from prometheus_client.metrics import Counter, Histogram

from monitoring.metrics import Metrics
from service.errors import ModelNotFound
from service.runtime import StudentSession
from service.tensors import Signature

PROTOCOLS = ("v2", "v1")
COMMON_CODES = (200, 400, 404, 413, 500, 503)
_SLOTS = 100  # weights are percentages


class RequestCounters:
    """`kdgate_requests_total` children for one (model, version), bound once per code."""

    def __init__(self, metrics: Metrics, model: str, version: str, *, prebind: bool = True):
        self._family = metrics.requests
        self._model = model
        self._version = version
        self._children: dict[tuple[str, int], Counter] = {}
        if prebind:
            for protocol in PROTOCOLS:
                for code in COMMON_CODES:
                    self._children[protocol, code] = self._bind(protocol, code)

    def inc(self, protocol: str, code: int) -> None:
        child = self._children.get((protocol, code))
        if child is None:
            child = self._children[protocol, code] = self._bind(protocol, code)
        child.inc()

    def _bind(self, protocol: str, code: int) -> Counter:
        return self._family.labels(self._model, self._version, protocol, str(code))


class Variant:
    """One student version of a model, ready to run, with its pre-bound metric children."""

    def __init__(self, model: str, session: StudentSession, version: str, metrics: Metrics):
        self.model = model
        self.version = version
        self.session = session
        self.signature: Signature = session.signature
        self.requests = RequestCounters(metrics, model, version)
        self.duration: Histogram = metrics.request_duration.labels(model, version)
        self.version_header = (b"x-kdgate-model-version", version.encode())


class Router:
    """A model's variants and the traffic split between them."""

    def __init__(
        self,
        model: str,
        variants: Mapping[str, Variant],
        weights: Mapping[str, int],
        sticky_header: str,
    ) -> None:
        unknown = set(weights) - set(variants)
        if unknown or sum(weights.values()) != _SLOTS:
            raise ValueError(f"weights {dict(weights)} must sum to 100 over {list(variants)}")
        self.model = model
        self.variants = dict(variants)
        self.weights = dict(weights)
        self.sticky_header = sticky_header.lower().encode()
        self._slots: list[Variant] = [
            self.variants[version] for version, w in weights.items() for _ in range(w)
        ]
        self._only = self._slots[0] if len(set(map(id, self._slots))) == 1 else None

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
