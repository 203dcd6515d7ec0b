"""Run-time traffic changes: the split, versions loaded and removed, promote and roll back.

Every change runs under one admin-only lock (the request path takes none):

    validate -> [load, sha256-verify and warm a new version in a worker thread]
             -> build a new Router -> save the state file (worker thread)
             -> assign it to ServingState.routers[model] -> kdgate_traffic_weight -> audit line

Saving before the swap means a change the disk refused is not applied either, and the swap is one
assignment, so a request sees the old Router or the new one, never half of each. A removed
version is drained after the swap: requests that picked it before still hold it, and the removal
answers once they have finished (nothing else keeps a Variant alive; see `_drain`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from kdgate.service.cards import ModelCard, load_card
from kdgate.service.errors import InvalidInput, KdgateError
from kdgate.service.routing import Router, Variant
from kdgate.service.settings import StudentSettings, TrafficSettings
from kdgate.service.state import ServingState, VariantFactory
from kdgate.service.traffic_store import SavedModel, TrafficStore

log = logging.getLogger(__name__)
audit_log = logging.getLogger("kdgate.audit")

_DRAIN_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class Caller:
    """Who asked for a change, as the audit line names them (never the token itself)."""

    token_fingerprint: str
    address: str


def problems(exc: ValidationError) -> str:
    """A pydantic error list as one line: `field: message; ...`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )


class TrafficControl:
    """Applies, saves and audits traffic changes for the models of one serving state."""

    def __init__(self, state: ServingState, build: VariantFactory, store: TrafficStore) -> None:
        self.state = state
        self.build = build
        self.store = store
        self._cards: dict[str, dict[str, Path]] = {
            m.name: {s.version: s.card for s in m.students} for m in state.settings.models
        }
        self._previous: dict[str, dict[str, int] | None] = {
            name: entry.previous_weights for name, entry in store.saved.models.items()
        }
        self._lock = asyncio.Lock()

    def publish(self) -> None:
        """Set `kdgate_traffic_weight` for every loaded model (once the routers exist)."""
        for router in self.state.routers.values():
            self._publish(router)

    def versions(self, model: str) -> dict[str, Any]:
        """The loaded versions of `model` with weight, card and sha256; the previous weights."""
        router = self.state.router(model)
        cards = self._cards[model]
        return {
            "versions": [
                {
                    "version": version,
                    "weight": router.weights[version],
                    "card": str(cards[version]),
                    "sha256": variant.session.card.sha256,
                }
                for version, variant in router.variants.items()
            ],
            "previous_weights": self._previous.get(model),
        }

    async def set_traffic(
        self, model: str, changes: Mapping[str, Any], caller: Caller
    ) -> TrafficSettings:
        """Change any of weights, sticky header and shadow fraction; the rest stays."""
        async with self._lock:
            current = self.state.router(model)
            try:
                traffic = TrafficSettings.model_validate(
                    {**current.traffic.model_dump(), **changes}
                )
            except ValidationError as exc:
                reason = problems(exc)
                raise InvalidInput(f"traffic of model {model!r} not changed: {reason}") from None
            return await self._apply(current, traffic, caller, "traffic.put")

    async def promote(self, model: str, version: str, caller: Caller) -> TrafficSettings:
        """Send all of `model`'s split traffic to `version`."""
        async with self._lock:
            current = self.state.router(model)
            current.get(version)  # 404 for a version that is not loaded
            weights = {v: 100 if v == version else 0 for v in current.variants}
            traffic = current.traffic.model_copy(update={"weights": weights})
            return await self._apply(current, traffic, caller, "traffic.promote")

    async def rollback(self, model: str, caller: Caller) -> TrafficSettings:
        """Return to the weights before the last weight change (twice: back again)."""
        async with self._lock:
            current = self.state.router(model)
            previous = self._previous.get(model)
            if previous is None:
                raise InvalidInput(
                    f"model {model!r} has no previous weights to roll back to: its weights have "
                    "not changed through the admin API"
                )
            # A version removed since then is no obstacle as long as it had no share.
            weights = {v: w for v, w in previous.items() if w or v in current.variants}
            traffic = current.traffic.model_copy(update={"weights": weights})
            return await self._apply(current, traffic, caller, "traffic.rollback")

    async def load_version(
        self, model: str, card: Path, version: str | None, caller: Caller
    ) -> dict[str, Any]:
        """Load, verify and warm a new version from its card; it joins with weight 0."""
        async with self._lock:
            current = self.state.router(model)
            try:
                card, found = await asyncio.to_thread(_read_card, card)
                student = StudentSettings(version=version or found.version, card=card)
            except (OSError, ValueError) as exc:
                reason = problems(exc) if isinstance(exc, ValidationError) else exc
                raise InvalidInput(f"no version loaded from {card}: {reason}") from None
            version = student.version
            if found.role != "student":
                raise InvalidInput(f"{card} is a {found.role} card; only students serve")
            if version in current.variants:
                raise InvalidInput(
                    f"model {model!r} already has version {version!r}; remove it first or load "
                    "this card under another version"
                )
            variant = await asyncio.to_thread(self._prepare, current, student)
            router = Router(
                model,
                {**current.variants, version: variant},
                current.weights,
                current.sticky_header.decode(),
                current.shadow_fraction,
            )
            cards = {**self._cards[model], version: card}
            await self._commit(current, router, cards, self._previous.get(model))
            entry = {"version": version, "card": str(card), "sha256": variant.session.card.sha256}
            self._audit(caller, "version.load", model, entry)
            return {**entry, "weight": 0}

    async def remove_version(self, model: str, version: str, caller: Caller) -> dict[str, Any]:
        """Stop routing to `version` (weight must be 0), then wait for its requests to finish."""
        async with self._lock:
            gone = await self._unroute(model, version)
            started = time.monotonic()
            drained = await _drain(gone, self.state.settings.server.graceful_shutdown_seconds)
            result = {
                "model": model,
                "removed": version,
                "drained": drained,
                "drain_seconds": round(time.monotonic() - started, 3),
            }
            self._audit(caller, "version.remove", model, result)
            return result

    async def _unroute(self, model: str, version: str) -> weakref.ref[Variant]:
        current = self.state.router(model)
        removed = current.get(version)  # 404 for a version that is not loaded
        if current.weights[version] > 0:
            raise InvalidInput(
                f"version {version!r} still takes {current.weights[version]}% of model "
                f"{model!r}'s traffic; set its weight to 0 first (PUT /admin/models/{model}/"
                "traffic, or promote another version)"
            )
        remaining = {v: variant for v, variant in current.variants.items() if v != version}
        router = Router(
            model,
            remaining,
            {v: current.weights[v] for v in remaining},
            current.sticky_header.decode(),
            current.shadow_fraction,
        )
        cards = {v: path for v, path in self._cards[model].items() if v != version}
        await self._commit(current, router, cards, self._previous.get(model))
        # Only the weak reference leaves this frame: `current` and `removed` die with it.
        return weakref.ref(removed)

    def _prepare(self, current: Router, student: StudentSettings) -> Variant:
        """Build, check and warm a variant (blocking: runs in a worker thread)."""
        model = current.model
        try:
            variant = self.build(model, student, signature=current.signature)
        except InvalidInput:
            raise
        except Exception as exc:  # a file the caller named: any failure to load it is theirs
            raise InvalidInput(
                f"version {student.version!r} of model {model!r} refused: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        variant.session.warm_up(self.state.settings.server.warmup_runs)
        return variant

    async def _apply(
        self, current: Router, traffic: TrafficSettings, caller: Caller, action: str
    ) -> TrafficSettings:
        model = current.model
        unknown = sorted(set(traffic.weights) - set(current.variants))
        if unknown:
            raise InvalidInput(
                f"traffic of model {model!r} not changed: weights name versions {unknown} it does "
                f"not have; loaded versions: {list(current.variants)}"
            )
        if not traffic.weights:
            raise InvalidInput(f"traffic of model {model!r} not changed: weights are empty")
        router = Router.from_traffic(model, current.variants, traffic)
        previous = self._previous.get(model)
        if router.weights != current.weights:
            previous = current.weights
        await self._commit(current, router, self._cards[model], previous)
        before = current.traffic.model_dump()
        self._audit(caller, action, model, {"before": before, "after": router.traffic.model_dump()})
        return router.traffic

    async def _commit(
        self,
        current: Router,
        router: Router,
        cards: dict[str, Path],
        previous: dict[str, int] | None,
    ) -> None:
        """Save, then swap `router` in: the only place a Router replaces another."""
        model = router.model
        entry = SavedModel(
            students=[StudentSettings(version=v, card=cards[v]) for v in router.variants],
            traffic=router.traffic,
            previous_weights=previous,
        )
        saved = self.store.saved
        saved = saved.model_copy(update={"models": {**saved.models, model: entry}})
        try:
            await asyncio.to_thread(self.store.write, saved)
        except OSError as exc:
            raise KdgateError(
                f"traffic of model {model!r} not changed: could not save {self.store.path}: {exc}"
            ) from None
        self._cards[model] = cards
        self._previous[model] = previous
        self.state.routers[model] = router
        self.state.versions[model] = list(router.variants)
        self._publish(router, current.variants)

    def _publish(self, router: Router, before: Iterable[str] = ()) -> None:
        gauge = self.state.metrics.traffic_weight
        for version, weight in router.weights.items():
            gauge.labels(router.model, version).set(weight)
        for version in set(before) - set(router.variants):
            gauge.remove(router.model, version)

    def _audit(self, caller: Caller, action: str, model: str, change: Mapping[str, Any]) -> None:
        line = {
            "who": caller.token_fingerprint,
            "from": caller.address,
            "action": action,
            "model": model,
            **change,
        }
        audit_log.info("audit %s", orjson.dumps(line).decode())


def _read_card(path: Path) -> tuple[Path, ModelCard]:
    """The absolute card path and the card (blocking)."""
    path = path.expanduser().resolve()
    return path, load_card(path)


async def _drain(gone: weakref.ref[Variant], timeout_seconds: float) -> bool:
    """Wait until no request holds the variant any more; False if `timeout_seconds` pass first.

    A request keeps the Variant (and the Router it came from) in its handler's locals from the
    pick to the response, and nothing else holds a removed one (the old Router was replaced), so
    the weak reference dies exactly when the last such request has finished.
    """
    deadline = time.monotonic() + timeout_seconds
    while gone() is not None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(_DRAIN_POLL_SECONDS)
    return True
