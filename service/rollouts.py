"""Rollouts: a candidate version goes through declared steps, each gated on an analysis of paired
evidence against the incumbent; pass -> next step or promoted, fail -> rolled back.

    rollouts = Rollouts(settings, control, runtime)
    await rollouts.start()        # lifespan, after traffic and monitoring started
    await rollouts.begin("digits", "2", steps=None, criteria=None, caller=who)   # admin API
    await rollouts.stop()

State: the model's entry of the traffic file holds the rollout (`RolloutRecord`: candidate,
incumbent, steps, criteria, step, state, times, the analysis of the last transition, reason).
Every change (start, step, promote, roll back, pause, resume, abort) is one write of that entry,
weights and record together, through `TrafficControl.change_entry` (the path of every admin
change: planned, written atomically, applied, audited), so it survives restarts and every
process following the file serves the step's weights.

The driver: once per traffic file, the process that can write it, leads its host
(service/leader.py) and holds a lock beside the file evaluates each running rollout every
`TICK_SECONDS`. Its shadow path feeds the paired window of the current step
(monitoring/rollout_evidence.py); `monitoring.rollout_analysis.analyse` decides pass, fail or
wait. The window and the step's clock (`min_seconds`, `max_seconds`) live in that process: a
step resumed after a restart, a pause or a change of driver collects its evidence afresh.
Transitions go to the audit log (`kdgate.audit`, with the figures) and, when `webhook.url` is
set, to the outbox as signed `rollout.*` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdgate.monitoring.outbox import ROLLOUT_KEY_PREFIX, OutboxUnavailable
from kdgate.monitoring.rollout_analysis import Analysis, Criteria, PairedWindow, analyse
from kdgate.monitoring.webhook import rollout_payload
from kdgate.service.errors import Conflict, InvalidInput, KdgateError, ModelNotFound
from kdgate.service.leader import HostLeader
from kdgate.service.monitoring_runtime import MonitoringRuntime
from kdgate.service.settings import ModelSettings
from kdgate.service.traffic import Caller, TrafficControl, problems
from kdgate.service.traffic_store import RolloutRecord, TrafficEntry

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
DRIVER = Caller("kdgate", "rollout driver")
CONFIG = Caller("kdgate", "config (models[].rollout.candidate)")


@dataclass
class _Step:
    """The evidence of one step, collected in this process."""

    key: tuple[float, int, float]  # started_at, step, step_started_at
    window: PairedWindow
    since: float  # time.monotonic() when collection began
    analysis: Analysis | None = None
    at: float | None = None  # unix seconds of `analysis`


class Rollouts:
    """Starts, drives and reports the rollouts of one app's models."""

    def __init__(
        self,
        config: Iterable[ModelSettings],
        control: TrafficControl,
        runtime: MonitoringRuntime,
        *,
        tick_seconds: float = TICK_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = {m.name: m for m in config}
        self.control = control
        self.runtime = runtime
        self.tick_seconds = tick_seconds
        self._clock = clock
        target = Path(os.path.realpath(control.store.path))
        self._lock = HostLeader(
            target.parent / f".{target.name}.rollouts.lock",
            name="this process",
            duties=f"the rollouts of {control.store.path}",
        )
        self._steps: dict[str, _Step] = {}
        self._configured: set[str] = set()  # models whose config rollout was looked at
        self._task: asyncio.Task[None] | None = None
        self._last_error: str | None = None

    # -- lifespan ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kdgate-rollouts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for monitoring in self.runtime.models.values():
            if monitoring.evidence is not None:
                monitoring.evidence.stop()
        self._lock.release()

    # -- admin ---------------------------------------------------------------------------------

    def describe(self, model: str) -> dict[str, Any]:
        """The rollout object of `model`: its record, the weights and the latest analysis."""
        entry = self.control.entry(model)
        record = entry.rollout
        if record is None:
            raise ModelNotFound(
                f"model {model!r} has no rollout; start one with POST /admin/models/{model}/rollout"
            )
        answer: dict[str, Any] = {"model": model, **record.model_dump(mode="json")}
        answer["weight"] = record.weight
        answer["weights"] = dict(entry.weights)
        step = self._steps.get(model)
        if step is not None and step.analysis is not None and step.key == _key(record):
            answer["analysis"] = {
                **step.analysis.to_json(),
                "at": step.at,
                "elapsed_seconds": round(time.monotonic() - step.since, 3),
            }
        return answer

    async def begin(
        self,
        model: str,
        candidate: str,
        *,
        steps: list[Any] | None,
        criteria: Mapping[str, Any] | None,
        caller: Caller,
    ) -> dict[str, Any]:
        """Start a rollout of `candidate` from the version serving all of `model`'s traffic."""
        settings = self._model(model).rollout
        try:
            specs = settings.step_specs(steps)
        except ValueError as exc:
            reason = problems(exc) if isinstance(exc, ValidationError) else str(exc)
            raise InvalidInput(f"rollout of model {model!r} not started: steps: {reason}") from None
        try:
            chosen = Criteria.model_validate({**settings.criteria.model_dump(), **(criteria or {})})
        except ValidationError as exc:
            raise InvalidInput(
                f"rollout of model {model!r} not started: criteria: {problems(exc)}"
            ) from None
        monitoring = self.runtime.model(model)
        if monitoring is None or monitoring.evidence is None:
            raise InvalidInput(
                f"model {model!r} is not compared with a teacher here (no teacher, or one whose "
                "outputs do not pair with the student's): a rollout is judged on that comparison"
            )
        now = self._clock()

        def edit(entry: TrafficEntry) -> TrafficEntry:
            if entry.rollout is not None and entry.rollout.active:
                raise Conflict(
                    f"a rollout of version {entry.rollout.candidate!r} is {entry.rollout.state} "
                    f"for model {model!r}; abort it first"
                )
            self.control.state.router(model).get(candidate)  # 404 for a version not loaded
            serving = [v for v, w in entry.weights.items() if w]
            if len(serving) != 1:
                raise Conflict(
                    f"model {model!r} splits its traffic {entry.weights}: a rollout starts from "
                    "one version serving all of it (promote one first)"
                )
            if serving[0] == candidate:
                raise InvalidInput(f"version {candidate!r} already serves all of model {model!r}")
            if entry.shadow_fraction == 0:
                raise InvalidInput(
                    f"model {model!r} has shadow_fraction 0: a rollout compares the versions on "
                    "shadowed requests; raise it first (PUT .../traffic)"
                )
            record = RolloutRecord(
                candidate=candidate,
                incumbent=serving[0],
                steps=specs,
                criteria=chosen,
                started_at=now,
                step_started_at=now,
            )
            return _with(entry, record)

        entry = await self._change(model, edit, caller, "rollout.start")
        self._event(model, "rollout.started", entry.rollout)
        return self.describe(model)

    async def pause(self, model: str, caller: Caller) -> dict[str, Any]:
        """Hold the current step: weights stay, no evidence is gathered, nothing is decided."""
        await self._change(
            model, self._transition(model, {"running"}, state="paused"), caller, "rollout.pause"
        )
        return self.describe(model)

    async def resume(self, model: str, caller: Caller) -> dict[str, Any]:
        """Go on with the paused step; its evidence and clock start afresh."""
        edit = self._transition(model, {"paused"}, state="running", step_started_at=self._clock())
        await self._change(model, edit, caller, "rollout.resume")
        return self.describe(model)

    async def abort(self, model: str, caller: Caller) -> dict[str, Any]:
        """End the rollout: the incumbent takes all the traffic again."""
        reason = "aborted through the admin API"
        edit = self._transition(
            model, {"running", "paused"}, state="aborted", reason=reason, weight=0
        )
        entry = await self._change(model, edit, caller, "rollout.abort")
        self._event(model, "rollout.rolled_back", entry.rollout)
        return self.describe(model)

    # -- the driver ----------------------------------------------------------------------------

    async def _run(self) -> None:
        """Evaluate every `tick_seconds` for ever; an error is logged and the loop goes on."""
        while True:
            try:
                await self.tick()
                self._last_error = None
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                if message != self._last_error:  # one traceback per distinct fault
                    log.exception("rollout driver: %s; retried in %g s", message, self.tick_seconds)
                self._last_error = message
            await asyncio.sleep(self.tick_seconds)

    def drives(self) -> bool:
        """Whether this process drives the rollouts of its traffic file now."""
        if self.control.store.writable() is not None or not self.runtime.leader.held:
            return False
        return self._lock.try_acquire()

    async def tick(self) -> None:
        """One evaluation of every model's rollout (only in the process that drives them)."""
        pending = {m for m, c in self._config.items() if c.rollout.candidate is not None}
        running = {m for m in self._config if _running(self.control.entry(m).rollout)}
        if not (pending - self._configured or running or self._lock.held):
            return  # nothing to drive: not even the lock file is made
        if not self.drives():
            self._unwatch(set(self._steps))
            return
        for model in self._config:
            if model not in self._configured:
                self._configured.add(model)
                await self._from_config(model)
            record = self.control.entry(model).rollout
            if record is None or record.state != "running":
                self._unwatch({model})
                continue
            await self._evaluate(model, record)

    def _collect(self, model: str, record: RolloutRecord | None) -> _Step | None:
        """The evidence of `record`'s current step, gathered from now on if it was not yet
        (None unless it is running). Called at once after a change, so no shadowed request
        between the change and the next tick goes uncompared."""
        if record is None or record.state != "running":
            self._unwatch({model})
            return None
        step = self._steps.get(model)
        if step is None or step.key != _key(record):
            step = self._steps[model] = _Step(_key(record), PairedWindow(), time.monotonic())
            monitoring = self.runtime.model(model)
            if monitoring is not None and monitoring.evidence is not None:
                monitoring.evidence.watch(record.candidate, record.incumbent, step.window)
            log.info(
                "rollout of %s v%s: step %d (weight %d) collects evidence",
                model,
                record.candidate,
                record.step,
                record.weight,
            )
        return step

    def _changed(self, model: str, entry: TrafficEntry) -> None:
        """After a change this process made: collect for the new step at once if it drives."""
        if self.drives():
            self._collect(model, entry.rollout)

    async def _evaluate(self, model: str, record: RolloutRecord) -> None:
        step = self._collect(model, record)
        assert step is not None  # the record is running
        spec = record.steps[record.step]
        loaded = self.control.state.router(model).variants
        missing = [v for v in (record.candidate, record.incumbent) if v not in loaded]
        if missing:  # e.g. its card went missing: nothing can be compared, so nothing passes
            why = self.control.state.not_loaded[model].get(missing[0], "not in the routing")
            step.analysis = Analysis("fail", 0, [], f"version {missing[0]!r} is not loaded: {why}")
        else:
            # In a thread: the ECE bootstrap over a full window is milliseconds of numpy.
            step.analysis = await asyncio.to_thread(
                partial(
                    analyse,
                    step.window,
                    record.criteria,
                    min_samples=spec.min_samples,
                    elapsed_seconds=time.monotonic() - step.since,
                    min_seconds=spec.min_seconds,
                    max_seconds=spec.max_seconds,
                )
            )
        analysis = step.analysis
        step.at = self._clock()
        if analysis.decision == "wait":
            return
        figures = analysis.to_json()
        reason: str | None
        if analysis.decision == "fail":
            changes: dict[str, Any] = {"state": "rolled_back", "weight": 0}
            action, event = "rollout.rollback", "rollout.rolled_back"
            reason = analysis.reason
        elif record.step + 1 < len(record.steps):
            following = record.step + 1
            changes = {"step": following, "step_started_at": self._clock()}
            changes["weight"] = record.steps[following].weight
            action, event, reason = "rollout.step", "rollout.step_passed", None
        else:
            changes = {"state": "promoted", "weight": 100}
            action, event, reason = "rollout.promote", "rollout.promoted", "every step passed"
        edit = self._transition(
            model, {"running"}, expect=record, analysis=figures, reason=reason, **changes
        )
        try:
            entry = await self._change(model, edit, DRIVER, action)
        except KdgateError as exc:  # the file moved under us, or a pause came first: next tick
            log.info("rollout of %s: %s not applied (%s); evaluated again", model, action, exc)
            return
        log.log(
            logging.WARNING if analysis.decision == "fail" else logging.INFO,
            "rollout of %s v%s: step %d (weight %d) %s: %s",
            model,
            record.candidate,
            record.step,
            record.weight,
            "failed, rolled back" if analysis.decision == "fail" else "passed",
            analysis.reason,
        )
        # The event names the step that was decided and the figures that decided it.
        self._event(model, event, entry.rollout, decided=record)

    async def _from_config(self, model: str) -> None:
        """Start the rollout `models[].rollout.candidate` asks for, once: not when the traffic
        file holds a rollout of that candidate already (whatever its state)."""
        candidate = self._config[model].rollout.candidate
        if candidate is None:
            return
        entry = self.control.entry(model)
        if entry.rollout is not None and entry.rollout.candidate == candidate:
            return
        try:
            await self.begin(model, candidate, steps=None, criteria=None, caller=CONFIG)
        except KdgateError as exc:
            log.error("rollout of %s v%s from the config not started: %s", model, candidate, exc)

    def _unwatch(self, models: set[str]) -> None:
        for model in models:
            self._steps.pop(model, None)
            monitoring = self.runtime.model(model)
            if monitoring is not None and monitoring.evidence is not None:
                monitoring.evidence.stop()

    # -- changes and events --------------------------------------------------------------------

    def _transition(
        self,
        model: str,
        allowed: set[str],
        *,
        expect: RolloutRecord | None = None,
        weight: int | None = None,
        **changes: Any,
    ) -> Callable[[TrafficEntry], TrafficEntry]:
        """An edit moving the rollout of `model` on (`changes` to its record; `weight`: the
        candidate's new weight), refused with 409 unless its state is in `allowed` (and, with
        `expect`, it is still that record)."""

        def edit(entry: TrafficEntry) -> TrafficEntry:
            record = entry.rollout
            if record is None:
                raise ModelNotFound(f"model {model!r} has no rollout")
            if record.state not in allowed or (expect is not None and record != expect):
                raise Conflict(
                    f"the rollout of version {record.candidate!r} of model {model!r} is "
                    f"{record.state}; this needs it {' or '.join(sorted(allowed))}"
                )
            updated = dict(changes)
            if updated.get("state") in ("promoted", "rolled_back", "aborted"):
                updated["finished_at"] = self._clock()
            new = RolloutRecord.model_validate({**record.model_dump(), **updated})
            return _with(entry, new, weight)

        return edit

    async def _change(
        self, model: str, edit: Callable[[TrafficEntry], TrafficEntry], caller: Caller, action: str
    ) -> TrafficEntry:
        self._model(model)
        entry = await self.control.change_entry(model, edit, caller, action, _audited)
        self._changed(model, entry)
        return entry

    def _event(
        self,
        model: str,
        event: str,
        record: RolloutRecord | None,
        *,
        decided: RolloutRecord | None = None,
    ) -> None:
        """Queue a signed `rollout.*` event (when `webhook.url` is set) and wake the notifier."""
        outbox = self.runtime.outbox
        if record is None or outbox is None or self.runtime.settings.webhook.url is None:
            return
        about = decided or record
        data = {
            **_summary(record),
            "model": model,
            "step": about.step,
            "weight": about.weight,
            "checks": (record.analysis or {}).get("checks", []),
            "samples": (record.analysis or {}).get("samples"),
            "reason": record.reason or (record.analysis or {}).get("reason"),
        }
        # One event per rollout, type and step, however often it is queued.
        key = f"{ROLLOUT_KEY_PREFIX}{model}:{event}:{record.candidate}:{record.started_at!r}"
        key += f":{about.step}"
        task = asyncio.create_task(self._enqueue(rollout_payload(event, data), key, model))
        task.add_done_callback(_log_failure)

    async def _enqueue(self, payload: dict[str, Any], key: str, model: str) -> None:
        outbox = self.runtime.outbox
        assert outbox is not None
        try:
            await asyncio.to_thread(outbox.enqueue, payload, dedup_key=key, model=model)
        except OutboxUnavailable as exc:
            log.error("rollout event %s of %s not queued: %s", payload["type"], model, exc)
            return
        self.runtime.wake_notifier()

    def _model(self, model: str) -> ModelSettings:
        self.control.entry(model)  # 404 for an unknown model, 503 while loading
        return self._config[model]

    def latest(self) -> Iterator[tuple[str, RolloutRecord, dict[str, Any] | None]]:
        """Per model with a rollout: its record and the latest analysis as JSON (the live one
        of the current step on the driving process, else the last transition's)."""
        for model in self._config:
            entry = self.control.document.models.get(model)
            record = entry.rollout if entry is not None else None
            if record is None:
                continue
            current = self._steps.get(model)
            analysis = current.analysis if current is not None else None
            yield model, record, analysis.to_json() if analysis is not None else record.analysis


def _running(record: RolloutRecord | None) -> bool:
    return record is not None and record.state == "running"


def _key(record: RolloutRecord) -> tuple[float, int, float]:
    return (record.started_at, record.step, record.step_started_at)


def _audited(entry: TrafficEntry) -> dict[str, Any]:
    """What an audit line of a rollout change says besides the weights."""
    record = entry.rollout
    assert record is not None  # every rollout change leaves a record
    return {"rollout": _summary(record), "analysis": record.analysis}


def _summary(record: RolloutRecord) -> dict[str, Any]:
    return {
        "candidate": record.candidate,
        "incumbent": record.incumbent,
        "state": record.state,
        "step": record.step,
        "weight": record.weight,
        "reason": record.reason,
    }


def _with(entry: TrafficEntry, record: RolloutRecord, weight: int | None = None) -> TrafficEntry:
    """`entry` holding `record`, with the candidate at `weight` (default: its step's weight) and
    the incumbent at the rest; any other version at 0."""
    share = record.weight if weight is None else weight
    weights = {version: 0 for version in entry.weights}
    weights[record.incumbent] = 100 - share
    weights[record.candidate] = share
    return entry.model_copy(update={"rollout": record, "weights": weights})


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("rollout event not queued: %r", task.exception())
