"""Traffic at run time: follow the traffic file, and change it through the admin API.

One traffic file (service/traffic_store.py) is the source every process follows. Both ways a
change arrives end in the same two steps, under one lock the request path never takes:

    watcher (every traffic.poll_seconds): the file's content or target changed
        -> parse -> plan -> swap                       (invalid: logged, counted, not applied)
    admin API (PUT/POST/DELETE /admin/...): validate against the current document
        -> plan -> write the file (atomically) -> swap (every other process's watcher follows)

`plan` loads, sha256-verifies and warms each version it does not serve yet (in a thread of its
own, under `admin.timeout_seconds`) and builds every model's new Router; a version with a share
that cannot be loaded refuses the whole change, one with weight 0 is listed as not loaded.
`swap` assigns each Router to `ServingState.routers[model]` in one step, so a request sees the
old split or the new one, never half of each. Planning before writing means a change the admin
API refuses never reaches the file, and writing before swapping means a change the disk refused
is not applied either. A removed version is drained after the swap: requests that picked it
before still hold it (nothing else keeps a Variant alive; see `_drain`).
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
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from kdgate.service.cards import ModelCard, model_path
from kdgate.service.errors import Conflict, DeadlineExceeded, InvalidInput, KdgateError
from kdgate.service.routing import Router, Variant
from kdgate.service.settings import ModelSettings, StudentSettings, TrafficSettings
from kdgate.service.state import ServingState, VariantFactory
from kdgate.service.traffic_store import (
    READ_ONLY_ERRNOS,
    Restored,
    Snapshot,
    TrafficDocument,
    TrafficEntry,
    TrafficStore,
    differing_keys,
)

_T = TypeVar("_T")

log = logging.getLogger(__name__)
audit_log = logging.getLogger("kdgate.audit")

_DRAIN_POLL_SECONDS = 0.01
CARD_MAX_BYTES = 1024 * 1024  # a card is a few kB of JSON
SOURCE_ERRORS = ("invalid", "refused", "unreadable")


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


class TrafficMetrics:
    """How the traffic source is followed, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source_errors = Counter(
            "kdgate_traffic_source_errors",
            "Traffic file contents refused (invalid, refused: a version with a share would not "
            "load; unreadable: the file could not be read); the last good split keeps serving.",
            ["reason"],
            registry=registry,
        )
        for reason in SOURCE_ERRORS:
            self.source_errors.labels(reason)
        self.differs = Gauge(
            "kdgate_traffic_source_differs",
            "1 while the traffic file's entry for a model differs from the config's students "
            "and traffic (the traffic file wins).",
            ["model"],
            registry=registry,
        )
        self.not_loaded = Gauge(
            "kdgate_traffic_version_not_loaded",
            "1 for a version the traffic source names at weight 0 that could not be loaded.",
            ["model", "version"],
            registry=registry,
        )


@dataclass(frozen=True)
class _Plan:
    """One model's next Router, the cards of its versions and the versions left out."""

    router: Router
    cards: dict[str, Path]
    not_loaded: dict[str, str]


class TrafficControl:
    """Follows the traffic file for the models of one serving state, and changes it."""

    def __init__(
        self,
        state: ServingState,
        build: VariantFactory,
        store: TrafficStore,
        restored: Restored,
        config: Iterable[ModelSettings],
        metrics: TrafficMetrics,
    ) -> None:
        self.state = state
        self.build = build
        self.store = store
        self.metrics = metrics
        self.document = restored.document
        self._differences = restored.differences
        self._config = {m.name: m for m in config}
        self._cards: dict[str, dict[str, Path]] = {
            m.name: {s.version: s.card for s in m.students} for m in state.settings.models
        }
        self._lock = asyncio.Lock()
        self._timeout = state.settings.admin.timeout_seconds
        self._poll_seconds = state.settings.traffic.poll_seconds
        self._seen: tuple[object, ...] | None = None
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Once the models are loaded: say where file and config disagree, export the
        weights, then follow the file."""
        for model, keys in self._differences.items():
            log.warning(
                "model %s: the traffic file %s differs from the config (models[].students and "
                "models[].traffic) on %s; the traffic file is the source of truth for traffic "
                "and is served. To serve the config's values, change the traffic file (the "
                "admin API, or an edit) or remove its entry for %s",
                model,
                self.store.path,
                "; ".join(keys),
                model,
            )
        unknown = sorted(set(self.document.models) - set(self._config))
        if unknown:
            log.warning(
                "the traffic file %s names models %s that this config does not serve: kept in "
                "the file, not served",
                self.store.path,
                unknown,
            )
        for router in self.state.routers.values():
            self._publish(router)
        self._exported()
        self._task = asyncio.create_task(self._watch(), name="kdgate-traffic-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def versions(self, model: str) -> dict[str, Any]:
        """The versions of `model`: loaded ones with weight, card and sha256, then those not
        loaded with the reason; the previous weights."""
        router = self.state.router(model)
        cards = self._cards[model]
        loaded = [
            {
                "version": version,
                "weight": router.weights[version],
                "card": str(cards[version]),
                "sha256": variant.session.card.sha256,
                "loaded": True,
            }
            for version, variant in router.variants.items()
        ]
        entry = self._entry(model)
        missing = [
            {"version": s.version, "weight": 0, "card": str(s.card), "loaded": False, "error": why}
            for s in entry.versions
            if (why := self.state.not_loaded[model].get(s.version)) is not None
        ]
        return {"versions": loaded + missing, "previous_weights": entry.previous_weights}

    async def set_traffic(
        self, model: str, changes: Mapping[str, Any], caller: Caller
    ) -> TrafficSettings:
        """Change any of weights, sticky header and shadow fraction; the rest stays."""
        async with self._exclusive(writing=True):
            entry = self._entry(model)
            try:
                traffic = TrafficSettings.model_validate({**entry.traffic.model_dump(), **changes})
            except ValidationError as exc:
                reason = problems(exc)
                raise InvalidInput(f"traffic of model {model!r} not changed: {reason}") from None
            if not traffic.weights:
                raise InvalidInput(f"traffic of model {model!r} not changed: weights are empty")
            if _shares(traffic.weights) != _shares(entry.weights):
                self._no_rollout(model, "change its weights")
            return await self._apply(model, traffic, caller, "traffic.put")

    async def promote(self, model: str, version: str, caller: Caller) -> TrafficSettings:
        """Send all of `model`'s split traffic to `version`."""
        async with self._exclusive(writing=True):
            current = self.state.router(model)
            current.get(version)  # 404 for a version that is not loaded
            self._no_rollout(model, "promote a version")
            weights = {v: 100 if v == version else 0 for v in current.variants}
            traffic = self._entry(model).traffic.model_copy(update={"weights": weights})
            return await self._apply(model, traffic, caller, "traffic.promote")

    async def rollback(self, model: str, caller: Caller) -> TrafficSettings:
        """Return to the weights before the last weight change (twice: back again)."""
        async with self._exclusive(writing=True):
            entry = self._entry(model)
            self._no_rollout(model, "roll its weights back")
            previous = entry.previous_weights
            if previous is None:
                raise InvalidInput(
                    f"model {model!r} has no previous weights to roll back to: its weights have "
                    "not changed through the admin API"
                )
            # A version removed since then is no obstacle as long as it had no share.
            known = entry.cards()
            weights = {v: w for v, w in previous.items() if w or v in known}
            traffic = entry.traffic.model_copy(update={"weights": weights})
            return await self._apply(model, traffic, caller, "traffic.rollback")

    async def load_version(
        self, model: str, card: Path, version: str | None, caller: Caller
    ) -> dict[str, Any]:
        """Load, verify and warm a new version from its card; it joins with weight 0."""
        async with self._exclusive(writing=True):
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
            entry = self._entry(model)
            if version in entry.cards():
                raise InvalidInput(
                    f"model {model!r} already has version {version!r}; remove it first or load "
                    "this card under another version"
                )
            variant = await _in_own_thread(deadline, self._prepare, current, student)
            grown = entry.model_copy(update={"versions": [*entry.versions, student]})
            await self._change(model, grown, {version: variant})
            result = {"version": version, "card": str(card), "sha256": variant.session.card.sha256}
            self._audit(caller, "version.load", model, result)
            return {**result, "weight": 0}

    async def remove_version(self, model: str, version: str, caller: Caller) -> dict[str, Any]:
        """Stop routing to `version` (weight must be 0), then wait for its requests to finish."""
        async with self._exclusive(writing=True):
            gone = await self._unroute(model, version)
            started = time.monotonic()
            limit = self.state.settings.server.graceful_shutdown_seconds
            drained = all([await _drain(ref, limit) for ref in gone])
            result = {
                "model": model,
                "removed": version,
                "drained": drained,
                "drain_seconds": round(time.monotonic() - started, 3),
            }
            self._audit(caller, "version.remove", model, result)
            return result

    def entry(self, model: str) -> TrafficEntry:
        """The traffic file's entry of `model` as this process serves it (404 when unknown)."""
        return self._entry(model)

    async def change_entry(
        self,
        model: str,
        edit: Callable[[TrafficEntry], TrafficEntry],
        caller: Caller,
        action: str,
        details: Callable[[TrafficEntry], Mapping[str, Any]],
    ) -> TrafficEntry:
        """Replace `model`'s entry by `edit(entry)` (which may raise a KdgateError to refuse),
        through the same plan, write and swap as every admin change, and audit it with
        `details(new entry)`. Used by rollouts, which change weights and their own record
        together."""
        async with self._exclusive(writing=True):
            await self._catch_up()
            entry = self._entry(model)
            changed = edit(entry)
            before = self.state.router(model).traffic
            if _shares(changed.weights) != _shares(entry.weights):
                changed = changed.model_copy(update={"previous_weights": before.weights})
            await self._change(model, changed, {})
            after = self.state.router(model).traffic
            self._audit(
                caller,
                action,
                model,
                {**details(changed), "before": before.weights, "after": after.weights},
            )
            return self._entry(model)

    async def _catch_up(self) -> None:
        """Under the lock: apply at once a change of the file this process has not applied yet
        (another worker's, less than a poll ago), so a change that builds on it (the rollout of
        a version another worker just loaded) finds it rather than a 404."""
        try:
            snapshot = await asyncio.to_thread(self.store.snapshot)
            document = self._desired(snapshot)
        except (OSError, ValueError):  # unreadable or invalid: the watcher says so
            return
        if document != self.document:
            self._swap(document, await self._plan(document, {}))
            self._seen = snapshot.key
            log.info("traffic: applied %s (%s) before a change", self.store.path, snapshot.key[0])

    def _no_rollout(self, model: str, what: str) -> None:
        """409 while a rollout drives `model`'s weights: it would undo the change at its next
        step, or the change would spoil its evidence."""
        rollout = self._entry(model).rollout
        if rollout is not None and rollout.active:
            raise Conflict(
                f"a rollout of version {rollout.candidate!r} ({rollout.state}) drives the weights "
                f"of model {model!r}: abort it first (POST /admin/models/{model}/rollout/abort) "
                f"to {what}"
            )

    @asynccontextmanager
    async def _exclusive(self, *, writing: bool = False) -> AsyncIterator[None]:
        """Hold the traffic lock; 504 after waiting `admin.timeout_seconds` for it. `writing`:
        409 first when the traffic file cannot be written here."""
        if writing and (why := self.store.writable()) is not None:
            raise self._read_only(why)
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

    def _read_only(self, why: str) -> Conflict:
        return Conflict(
            f"traffic is read from {self.store.path}, which this server does not change ({why}). "
            "Change that file where it comes from: edit the ConfigMap that holds it (kubectl "
            "apply -f, kubectl edit configmap) or your GitOps repository; every replica follows "
            "within seconds"
        )

    def _entry(self, model: str) -> TrafficEntry:
        self.state.router(model)  # 404 for an unknown model, 503 while loading
        return self.document.models[model]

    async def _apply(
        self, model: str, traffic: TrafficSettings, caller: Caller, action: str
    ) -> TrafficSettings:
        entry = self._entry(model)
        before = self.state.router(model).traffic
        previous = entry.previous_weights
        if _shares(traffic.weights) != _shares(before.weights):
            previous = before.weights
        try:
            changed = TrafficEntry.model_validate(
                {**entry.model_dump(), **traffic.model_dump(), "previous_weights": previous}
            )
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise InvalidInput(f"traffic of model {model!r} not changed: {reason}") from None
        await self._change(model, changed, {})
        after = self.state.router(model).traffic
        self._audit(
            caller, action, model, {"before": before.model_dump(), "after": after.model_dump()}
        )
        return after

    async def _unroute(self, model: str, version: str) -> list[weakref.ref[Variant]]:
        entry = self._entry(model)
        if version not in entry.cards():
            self.state.router(model).get(version)  # 404 naming the loaded versions
        rollout = entry.rollout
        if (
            rollout is not None
            and rollout.active
            and version in (rollout.candidate, rollout.incumbent)
        ):
            self._no_rollout(model, "remove a version it compares")
        share = entry.weights.get(version, 0)
        if share > 0:
            raise InvalidInput(
                f"version {version!r} still takes {share}% of model {model!r}'s traffic; set "
                f"its weight to 0 first (PUT /admin/models/{model}/traffic, or promote another "
                "version)"
            )
        remaining = entry.model_copy(
            update={
                "versions": [s for s in entry.versions if s.version != version],
                "weights": {v: w for v, w in entry.weights.items() if v != version},
            }
        )
        # Only weak references leave: the old Router and Variant die with the requests on them.
        return await self._change(model, remaining, {})

    async def _change(
        self, model: str, entry: TrafficEntry, prepared: Mapping[str, Variant]
    ) -> list[weakref.ref[Variant]]:
        """Plan `entry` for `model`, write the whole file, then swap (admin path)."""
        try:  # validated as the file will be read back (model_copy does not validate)
            entry = TrafficEntry.model_validate(entry.model_dump())
        except ValidationError as exc:
            raise InvalidInput(f"traffic of model {model!r} not changed: {problems(exc)}") from None
        document = self.document.model_copy(
            update={"models": {**self.document.models, model: entry}}
        )
        plans = await self._plan(document, {model: prepared})
        await self._check_unchanged()
        try:
            await asyncio.to_thread(self.store.write, document)
        except OSError as exc:
            if exc.errno in READ_ONLY_ERRNOS:
                raise self._read_only(f"{exc.strerror}") from None
            raise KdgateError(
                f"traffic of model {model!r} not changed: could not save {self.store.path}: {exc}"
            ) from None
        return self._swap(document, plans)

    async def _check_unchanged(self) -> None:
        """409 when the file holds a change this process has not applied yet (an edit, another
        replica's admin change): writing over it would lose that change."""
        try:
            on_file = self._desired(await asyncio.to_thread(self.store.snapshot))
        except (OSError, ValueError):  # unreadable or invalid: the write replaces it
            return
        if on_file != self.document:
            raise Conflict(
                f"{self.store.path} has changed since this server last applied it (an edit or "
                f"another replica's change); it is applied within {self._poll_seconds:g} s: "
                "read the traffic again and retry"
            )

    def _desired(self, snapshot: Snapshot) -> TrafficDocument:
        """What `snapshot` asks every process to serve: the file's entries over the config's
        (the config's alone when there is no file); ValueError for an invalid file."""
        served = {name: TrafficEntry.of(model) for name, model in self._config.items()}
        if snapshot.data is None:
            return TrafficDocument(models=served)
        return TrafficDocument(models={**served, **self.store.parse(snapshot.data).models})

    async def _plan(
        self, document: TrafficDocument, prepared: Mapping[str, Mapping[str, Variant]]
    ) -> dict[str, _Plan]:
        """Every served model's next Router under `document`: loads what it must (InvalidInput
        when a version with a share cannot be loaded; nothing is swapped yet)."""
        deadline = time.monotonic() + self._timeout
        plans: dict[str, _Plan] = {}
        for model, current in self.state.routers.items():
            entry = document.models[model]
            cards = self._cards[model]
            variants: dict[str, Variant] = {}
            not_loaded: dict[str, str] = {}
            for student in entry.versions:
                version = student.version
                ready = prepared.get(model, {}).get(version)
                if ready is None and cards.get(version) == student.card:
                    ready = current.variants.get(version)
                if ready is not None:
                    variants[version] = ready
                    continue
                try:
                    variants[version] = await _in_own_thread(
                        deadline, self._prepare, current, student
                    )
                except KdgateError as exc:
                    share = entry.weights.get(version, 0)
                    if share:
                        raise InvalidInput(
                            f"traffic of model {model!r} not changed: version {version!r} "
                            f"takes {share}% of it but cannot be loaded: {exc.message}"
                        ) from None
                    not_loaded[version] = exc.message
            weights = {v: w for v, w in entry.weights.items() if v in variants}
            router = Router(model, variants, weights, entry.sticky_header, entry.shadow_fraction)
            kept = {v: c for v, c in entry.cards().items() if v in variants}
            plans[model] = _Plan(router, kept, not_loaded)
        return plans

    def _swap(
        self, document: TrafficDocument, plans: Mapping[str, _Plan]
    ) -> list[weakref.ref[Variant]]:
        """Put every planned Router in service: the only place a Router replaces another.
        Returns weak references to the variants no longer served."""
        replaced: list[weakref.ref[Variant]] = []
        for model, plan in plans.items():
            before = self.state.routers[model].variants
            replaced += [
                weakref.ref(variant)
                for version, variant in before.items()
                if plan.router.variants.get(version) is not variant
            ]
            for version in set(self.state.not_loaded[model]) - set(plan.not_loaded):
                self.metrics.not_loaded.remove(model, version)
            self._cards[model] = plan.cards
            self.state.not_loaded[model] = plan.not_loaded
            self.state.routers[model] = plan.router
            self.state.versions[model] = list(plan.router.variants)
            self._publish(plan.router, before)
        self.document = document
        self._exported()
        return replaced

    def _exported(self) -> None:
        """Set the source gauges: where the file differs from the config, what is not loaded."""
        for model, config in self._config.items():
            entry = self.document.models.get(model)
            differs = entry is not None and bool(differing_keys(config, entry))
            self.metrics.differs.labels(model).set(differs)
            for version in self.state.not_loaded.get(model, {}):
                self.metrics.not_loaded.labels(model, version).set(1)

    def _prepare(self, current: Router, student: StudentSettings) -> Variant:
        """Build, check and warm a variant (blocking: runs in a worker thread)."""
        model = current.model
        try:
            _read_card(student.card)  # a FIFO or a device never reaches the loader
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

    async def _watch(self) -> None:
        """Poll the traffic file for ever; every error is logged and the loop goes on."""
        while True:
            try:
                snapshot = await asyncio.to_thread(self.store.snapshot)
                if snapshot.key != self._seen:
                    await self._follow(snapshot)
            except Exception as exc:
                self._refuse("unreadable", f"cannot read {self.store.path}: {exc}")
            await asyncio.sleep(self._poll_seconds)

    async def _follow(self, snapshot: Snapshot) -> None:
        """Apply the file as `snapshot` found it, or refuse it loudly."""
        try:
            document = self._desired(snapshot)
        except ValueError as exc:
            self._seen = snapshot.key
            self._refuse("invalid", str(exc))
            return
        # A version left unloaded (weight 0) is tried again whenever the file is touched.
        if document != self.document or any(self.state.not_loaded.values()):
            try:
                async with self._exclusive():
                    try:
                        plans = await self._plan(document, {})
                    except KdgateError as exc:
                        self._seen = snapshot.key
                        self._refuse("refused", f"{self.store.path} not applied: {exc.message}")
                        return
                    self._swap(document, plans)
            except DeadlineExceeded:  # an admin change holds the lock: the next poll retries
                return
            splits = {m: r.traffic.model_dump() for m, r in self.state.routers.items()}
            log.info(
                "traffic: applied %s (%s): %s",
                self.store.path,
                snapshot.key[0],
                orjson.dumps(splits).decode(),
            )
        self._seen = snapshot.key
        self._last_error = None

    def _refuse(self, reason: str, message: str) -> None:
        """Count every refusal; log each distinct one once (a poll repeats it every second)."""
        self.metrics.source_errors.labels(reason).inc()
        if message != self._last_error:
            log.error("traffic: %s; the last good split keeps serving", message)
            self._last_error = message

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


def _shares(weights: Mapping[str, int]) -> dict[str, int]:
    """The weights without the versions at 0 (a version left out has weight 0)."""
    return {version: weight for version, weight in weights.items() if weight}


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
