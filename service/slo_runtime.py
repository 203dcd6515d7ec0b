"""The background half of issue 5: SLO monitor, drift jobs, outbox and notifier of one app.

    runtime = SloRuntime(settings, metrics)
    await runtime.start()          # lifespan start, after the models loaded
    inference.input_taps = runtime.input_taps   # the request path feeds the drift buffers
    ...
    await runtime.stop()           # lifespan end: tasks stopped, pool and client closed

- Monitor (`monitoring.slo_monitor`): reads the exported counters from the app's registry every
  `slo.evaluate_every_seconds`; a new breach becomes a signed retrain request in the outbox.
- Drift (`monitoring.drift`): one job per model whose reference sample exists (`reference.npz`
  beside the student's card by default); runs every `drift.every_seconds` in a child process
  (`drift.executor: process`, so Evidently never holds the event loop's GIL) or a thread.
- Outbox (`monitoring.outbox`): opened at start when `webhook.url` is set, else at the first
  Alertmanager hook call; the notifier (`monitoring.webhook`) delivers while `webhook.url` is set.

Objectives come from the config and each model's student cards (`objectives_for`); with several
student versions the loosest objective of their cards is kept, so no version pages on clean data.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kdgate.monitoring.drift import DriftJob, InputBuffer, load_reference
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.priority import lowest_process_priority
from kdgate.monitoring.slo import Breach, Objective, objectives_for
from kdgate.monitoring.slo_monitor import Monitor
from kdgate.monitoring.webhook import Notifier, retrain_payload
from kdgate.service.cards import load_card
from kdgate.service.inference import InputTap
from kdgate.service.settings import ModelSettings, Settings

log = logging.getLogger(__name__)

LINKS = {"slo": "/v1/slo", "drift_report": "/v1/reports/drift"}


def loosest(per_card: Sequence[Sequence[Objective]]) -> list[Objective]:
    """Per SLO, the most lenient objective among several cards' objectives (same SLO order)."""
    chosen = []
    for candidates in zip(*per_card, strict=True):
        if candidates[0].kind == "min":
            chosen.append(min(candidates, key=lambda o: o.objective))
        else:
            chosen.append(max(candidates, key=lambda o: o.objective))
    return chosen


def model_objectives(settings: Settings) -> dict[str, list[Objective]]:
    """Each model's objectives from the config and its student cards (reads the cards)."""
    return {
        model.name: loosest(
            [
                objectives_for(load_card(s.card).metrics, settings.slo, model.name)
                for s in model.students
            ]
        )
        for model in settings.models
    }


@dataclass(frozen=True)
class _Versions:
    student: str | None
    teacher: str | None


def _versions(model: ModelSettings) -> _Versions:
    """The student version most traffic goes to, and the local teacher's card version."""
    weights = model.traffic.weights
    student = max(weights, key=lambda v: weights[v]) if weights else model.students[0].version
    teacher = None
    if model.teacher is not None and model.teacher.card is not None:
        teacher = load_card(model.teacher.card).version
    elif model.teacher is not None:
        teacher = model.teacher.model
    return _Versions(student, teacher)


def reference_path(model: ModelSettings, reference_file: str) -> Path:
    """The drift reference of `model`: absolute, or beside its first student's card."""
    path = Path(reference_file)
    return path if path.is_absolute() else model.students[0].card.parent / path


def _tap(buffer: InputBuffer, width: int) -> InputTap:
    """The request-path hook: of each request (oldest first), the first input, if it is a
    [n, width] matrix, into `buffer`."""

    def tap(requests: Sequence[Mapping[str, np.ndarray[Any, Any]]]) -> None:
        for inputs in requests:
            for rows in inputs.values():
                if rows.ndim == 2 and rows.shape[1] == width:
                    buffer.append(rows)
                break

    return tap


class SloRuntime:
    """Monitor, drift jobs, outbox and notifier for one app; `start`/`stop` in its lifespan.

    `client` (tests inject one) is the notifier's HTTP client; a fresh one is made otherwise.
    """

    def __init__(
        self, settings: Settings, metrics: Metrics, *, client: httpx.AsyncClient | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.monitor: Monitor | None = None
        self.outbox: Outbox | None = None
        self.notifier: Notifier | None = None
        self.drift_jobs: dict[str, DriftJob] = {}
        self.input_taps: dict[str, InputTap] = {}
        self.buffers: dict[str, InputBuffer] = {}  # model -> recent inputs for the drift job
        self._client = client
        self._own_client = client is None
        self._versions: dict[str, _Versions] = {}
        self._executor: Executor | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._notifier_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_lock = threading.Lock()

    def _prepare(self) -> dict[str, list[Objective]]:
        """Blocking part of `start`: cards, references, the outbox file."""
        objectives = model_objectives(self.settings)
        self._versions = {m.name: _versions(m) for m in self.settings.models}
        webhook = self.settings.webhook
        if webhook.url is not None:
            self.outbox = Outbox(webhook.outbox_path)
        drift = self.settings.drift
        if drift.enabled and drift.executor == "process":
            # spawn, not fork: the parent runs threads (onnxruntime, uvicorn) that fork would
            # copy in whatever state they are in. The child starts at the first run, at the
            # lowest CPU priority: on a core it shares with the gateway, requests come first.
            self._executor = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=lowest_process_priority,
            )
        if drift.enabled:
            for model in self.settings.models:
                path = reference_path(model, drift.reference_file)
                if not path.is_file():
                    log.warning("no drift reference for %s at %s: drift is off", model.name, path)
                    continue
                reference = load_reference(path, drift.reference_key)
                buffer = self.buffers[model.name] = InputBuffer(
                    drift.window_rows, reference.shape[1]
                )
                self.input_taps[model.name] = _tap(buffer, reference.shape[1])
                self.drift_jobs[model.name] = DriftJob(
                    model.name,
                    buffer,
                    reference,
                    drift,
                    self.metrics,
                    on_result=self._on_drift,
                    executor=self._executor,
                )
        return objectives

    async def start(self) -> None:
        """Build everything (files read in a thread) and start the background tasks."""
        self._loop = asyncio.get_running_loop()
        objectives = await asyncio.to_thread(self._prepare)
        self.monitor = Monitor(
            objectives,
            self.settings.slo,
            self.metrics,
            on_breach=self._on_breach if self.settings.webhook.url is not None else None,
        )
        self._tasks.append(asyncio.create_task(self.monitor.run(self._stop)))
        for job in self.drift_jobs.values():
            self._tasks.append(asyncio.create_task(job.run(self._stop)))
        if self.outbox is not None and self.settings.webhook.url is not None:
            if self._client is None:
                self._client = httpx.AsyncClient()
            self.notifier = Notifier(self.outbox, self._client, self.settings.webhook, self.metrics)
            self._notifier_task = asyncio.create_task(self.notifier.run())
        log.info(
            "SLO monitor on for %s; drift for %s; webhook %s",
            sorted(objectives),
            sorted(self.drift_jobs),
            "on" if self.notifier else "off (webhook.url is null)",
        )

    def _on_drift(self, model: str, share: float, rows: int) -> None:
        if self.monitor is not None:
            self.monitor.observe_drift(model, share, rows)

    def _on_breach(self, model: str, breach: Breach) -> None:
        """Monitor callback (worker thread): the breach into the outbox, then wake the notifier."""
        assert self.outbox is not None
        versions = self._versions[model]
        payload = retrain_payload(
            model,
            [breach],
            student_version=versions.student,
            teacher_version=versions.teacher,
            links=LINKS,
        )
        entry = self.outbox.enqueue_breach(
            model, breach["slo"], payload, cooldown_seconds=self.settings.webhook.cooldown_seconds
        )
        if entry is None:
            log.info(
                "SLO %s of %s breached again within the cooldown: not re-sent", breach["slo"], model
            )
            return
        log.warning("SLO %s of %s breached: retrain request %s queued", breach["slo"], model, entry)
        self.wake_notifier()

    def hook_outbox(self) -> Outbox:
        """The outbox for the Alertmanager hook, opened at its first use (blocking).

        Without `webhook.url` the file is only created once an alert arrives; its requests wait
        there until a URL is configured.
        """
        with self._open_lock:
            if self.outbox is None:
                self.outbox = Outbox(self.settings.webhook.outbox_path)
            return self.outbox

    def wake_notifier(self) -> None:
        """Deliver now (callable from any thread)."""
        if self.notifier is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.notifier.wake)

    async def stop(self) -> None:
        """Stop the tasks, wait for a drift run in flight, close the pool and the client."""
        self._stop.set()
        if self._notifier_task is not None:
            # An entry being delivered stays leased in the outbox and is retried after a restart.
            self._notifier_task.cancel()
            self._tasks.append(self._notifier_task)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        if self._client is not None and self._own_client:
            await self._client.aclose()
