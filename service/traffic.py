"""Run-time traffic changes: the split, versions loaded and removed, promote and roll back.

Every change runs under one admin-only lock (the request path takes none):

    validate -> [read the card, load, sha256-verify and warm a new version in a thread]
             -> build a new Router -> save the state file (worker thread)
             -> assign it to ServingState.routers[model] -> kdgate_traffic_weight -> audit line

Saving before the swap means a change the disk refused is not applied either, and the swap is one
assignment, so a request sees the old Router or the new one, never half of each. A removed
version is drained after the swap: requests that picked it before still hold it, and the removal
answers once they have finished (nothing else keeps a Variant alive; see `_drain`).

Nothing may hold the lock for good: a change waits at most `admin.timeout_seconds` for the one
before it, and a load (card and model files named by the caller: a FIFO, a device, a stalled
network mount) is refused unless they are regular files of bounded size, and is given up, 504,
once it has taken `admin.timeout_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from kdgate.service.cards import ModelCard, model_path
from kdgate.service.errors import DeadlineExceeded, InvalidInput, KdgateError
from kdgate.service.routing import Router, Variant
from kdgate.service.settings import StudentSettings, TrafficSettings
from kdgate.service.state import ServingState, VariantFactory
from kdgate.service.traffic_store import SavedModel, TrafficStore

_T = TypeVar("_T")

log = logging.getLogger(__name__)
audit_log = logging.getLogger("kdgate.audit")

_DRAIN_POLL_SECONDS = 0.01
CARD_MAX_BYTES = 1024 * 1024  # a card is a few kB of JSON


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
        self._timeout = state.settings.admin.timeout_seconds

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
        async with self._exclusive():
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
        async with self._exclusive():
            current = self.state.router(model)
            current.get(version)  # 404 for a version that is not loaded
            weights = {v: 100 if v == version else 0 for v in current.variants}
            traffic = current.traffic.model_copy(update={"weights": weights})
            return await self._apply(current, traffic, caller, "traffic.promote")

    async def rollback(self, model: str, caller: Caller) -> TrafficSettings:
        """Return to the weights before the last weight change (twice: back again)."""
        async with self._exclusive():
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
        async with self._exclusive():
            current = self.state.router(model)
            deadline = time.monotonic() + self._timeout
            try:
                card, found = await _in_own_thread(deadline, _read_card, card)
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
            variant = await _in_own_thread(deadline, self._prepare, current, student)
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
        async with self._exclusive():
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

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold the admin lock; 504 after waiting `admin.timeout_seconds` for it."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._lock.acquire()
        except TimeoutError:
            raise DeadlineExceeded(
                f"another admin change has run for over {self._timeout:g} s "
                "(admin.timeout_seconds); retry later"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

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
    """The absolute card path and the card, once the card is known to be a regular file of at
    most `CARD_MAX_BYTES` and its model file one of the size the card records (blocking)."""
    path = path.expanduser().resolve()
    fd, size = _open_regular(path)
    with open(fd, "rb") as fh:
        if size > CARD_MAX_BYTES:
            raise ValueError(f"{path} has {size} bytes; a card is a few kB of JSON")
        data = fh.read(CARD_MAX_BYTES + 1)  # a file grown since the check then fails to parse
    card = ModelCard.model_validate_json(data)
    model_file = model_path(path, card)
    fd, size = _open_regular(model_file)
    os.close(fd)
    if size != card.bytes:
        raise ValueError(f"{model_file} has {size} bytes but its card records {card.bytes}")
    return path, card


def _open_regular(path: Path) -> tuple[int, int]:
    """A descriptor open for reading on `path`, and its size; ValueError unless `path` is a
    regular file (blocking)."""
    # O_NONBLOCK: opening a FIFO to read otherwise waits for a writer, for ever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "something else")
        raise ValueError(f"{path} is {kind}, not a regular file")
    return fd, info.st_size


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


async def _in_own_thread(deadline: float, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)` in a thread of its own; DeadlineExceeded once `time.monotonic()` passes
    `deadline`, leaving the thread behind.

    Not the default executor: a read stuck in the kernel (a stalled network mount) cannot be
    interrupted, and would hold one of its few workers, and the shutdown that waits for them.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if done.done():  # given up on already
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(*args), None
        except BaseException as exc:  # handed to the waiting request, which raises it
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="kdgate-admin-load", daemon=True).start()
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            return await done
    except TimeoutError:
        name = getattr(work, "__name__", "the load")
        raise DeadlineExceeded(
            f"gave up loading after admin.timeout_seconds: {name} was still running (a file on "
            "a stalled mount?); nothing was changed"
        ) from None


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
