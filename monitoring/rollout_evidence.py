"""Paired evidence for a rollout, gathered on the shadow path of one model.

    evidence = RolloutEvidence(model, versions, teacher_kind="logits")
    ShadowWorker(..., evidence=evidence)       # after the teacher answered each batch
    evidence.watch(candidate, incumbent, PairedWindow())   # the rollout driver, per step
    evidence.stop()                            # no rollout: nothing is done per batch

While a pair is watched, every shadowed request's inputs are scored by the candidate and the
incumbent (in a worker thread, never on the event loop) and one paired row per input row goes to
the window, compared with the teacher's answer to the same inputs: top-1 class, top-1
probability and KL(teacher || version) of each version, or, for regression outputs, each
version's absolute error to the teacher. The version that served the request already has its
scores in the sample, so only the other one is run for them.

Latency: each version's run on the request's inputs is timed in the same thread, one after the
other, in alternating order, so the two figures are measured alike. That means the version that
served is run again for its timing (its scores stay the served ones): the latency clients saw
includes queueing and decoding that the candidate, which served nobody at a dark step, cannot
have, so it cannot be compared with a shadow run.

Labels posted to the feedback API reach the window through `attach_labels`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from kdgate.monitoring.fidelity import OutputKind, log_probabilities
from kdgate.monitoring.rollout_analysis import PairedWindow

log = logging.getLogger(__name__)

Arrays = Mapping[str, NDArray[Any]]
TIMEOUT_SECONDS = 10.0  # both versions on one shadow batch: milliseconds, normally


class Versions(Protocol):
    """The served versions of one model, as the evidence needs them (service side)."""

    def scores(self, version: str, inputs: Arrays) -> NDArray[Any]:
        """The scores output of `version` on `inputs` (blocking; KeyError when not loaded)."""
        ...

    def kind(self, version: str) -> OutputKind:
        """The output kind of `version`'s scores."""
        ...


class Sample(Protocol):
    """What the evidence reads of a shadow sample (monitoring/shadow.py `ShadowSample`)."""

    @property
    def request_id(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def inputs(self) -> Arrays: ...
    @property
    def student_scores(self) -> NDArray[Any]: ...


@dataclass(frozen=True)
class _Pair:
    candidate: str
    incumbent: str
    window: PairedWindow


@dataclass(frozen=True)
class _Measured:
    """One batch's paired rows, computed in the worker thread."""

    request_ids: list[str]
    candidate: NDArray[Any]  # scores [rows, ...]
    incumbent: NDArray[Any]
    latency_ms: list[tuple[float, float]]  # per request: (candidate, incumbent)


class RolloutEvidence:
    """Feeds the paired window of the rollout being watched (see the module docstring)."""

    def __init__(
        self,
        model: str,
        versions: Versions,
        *,
        teacher_kind: OutputKind,
        timeout_seconds: float = TIMEOUT_SECONDS,
    ) -> None:
        self.model = model
        self.versions = versions
        self.teacher_kind: OutputKind = teacher_kind
        self.timeout_seconds = timeout_seconds
        self._pair: _Pair | None = None
        self._turn = 0  # requests timed so far: which version runs first alternates across batches

    @property
    def watching(self) -> tuple[str, str] | None:
        """(candidate, incumbent) while a pair is watched."""
        pair = self._pair
        return None if pair is None else (pair.candidate, pair.incumbent)

    def watch(self, candidate: str, incumbent: str, window: PairedWindow) -> None:
        """Compare `candidate` with `incumbent` on every shadowed batch from now on, into
        `window` (replacing any pair watched before)."""
        self._pair = _Pair(candidate, incumbent, window)

    def stop(self) -> None:
        """Stop comparing: shadow batches cost nothing more."""
        self._pair = None

    async def observe(self, batch: Sequence[Sample], teacher_scores: NDArray[Any]) -> None:
        """One compared shadow batch (same input shapes; `teacher_scores` rows in the samples'
        order). Returns at once while nothing is watched; never raises."""
        pair = self._pair
        if pair is None or not batch:
            return
        try:
            # Bounded: a run stuck in onnxruntime costs this batch, not the shadow path.
            async with asyncio.timeout(self.timeout_seconds):
                measured = await asyncio.to_thread(self._measure, pair, batch)
            if self._pair is not pair:  # the step changed meanwhile: these rows are not its
                return
            self._add(pair, measured, teacher_scores)
        except Exception:  # evidence is best effort: the shadow path must go on
            log.exception("rollout evidence of %s: a shadow batch was not compared", self.model)

    def attach_labels(self, request_id: str, labels: NDArray[np.int64]) -> None:
        """Labels from the feedback API (one per row of the request) join its paired rows."""
        pair = self._pair
        if pair is None:
            return
        try:
            pair.window.attach_label(request_id, [int(label) for label in labels])
        except Exception:  # the feedback answer must not fail for the rollout's sake
            log.exception("rollout evidence of %s: a label was not attached", self.model)

    def _measure(self, pair: _Pair, batch: Sequence[Sample]) -> _Measured:
        """Score (and time) both versions on every request of `batch` (blocking)."""
        candidates, incumbents, latency = [], [], []
        request_ids: list[str] = []
        for sample in batch:
            timed: dict[str, tuple[NDArray[Any], float]] = {}
            order = (pair.candidate, pair.incumbent)
            # Alternate, so neither version always runs on a warmer cache; counted across
            # batches, as a shadow batch often holds one request.
            if self._turn % 2:
                order = order[::-1]
            self._turn += 1
            for version in order:
                started = time.perf_counter()
                scores = self.versions.scores(version, sample.inputs)
                timed[version] = (scores, (time.perf_counter() - started) * 1000.0)
            # The served version's scores are the ones its client got.
            served = {sample.version: sample.student_scores}
            candidates.append(served.get(pair.candidate, timed[pair.candidate][0]))
            incumbents.append(served.get(pair.incumbent, timed[pair.incumbent][0]))
            latency.append((timed[pair.candidate][1], timed[pair.incumbent][1]))
            request_ids += [sample.request_id] * len(sample.student_scores)
        return _Measured(
            request_ids, np.concatenate(candidates), np.concatenate(incumbents), latency
        )

    def _add(self, pair: _Pair, measured: _Measured, teacher: NDArray[Any]) -> None:
        window = pair.window
        if self.teacher_kind == "regression":
            rows = len(teacher)
            window.add_regression(
                candidate_abs_error=_row_abs_error(measured.candidate, teacher, rows),
                incumbent_abs_error=_row_abs_error(measured.incumbent, teacher, rows),
                request_ids=measured.request_ids,
            )
        else:
            log_p = log_probabilities(teacher, self.teacher_kind)
            p = np.exp(log_p)
            c_top1, c_conf, c_kl = _versus(
                p, log_p, measured.candidate, self.versions.kind(pair.candidate)
            )
            i_top1, i_conf, i_kl = _versus(
                p, log_p, measured.incumbent, self.versions.kind(pair.incumbent)
            )
            window.add_classification(
                teacher_top1=log_p.argmax(axis=1),
                candidate_top1=c_top1,
                incumbent_top1=i_top1,
                candidate_conf=c_conf,
                incumbent_conf=i_conf,
                candidate_kl=c_kl,
                incumbent_kl=i_kl,
                request_ids=measured.request_ids,
            )
        for candidate_ms, incumbent_ms in measured.latency_ms:
            window.add_latency("candidate", candidate_ms)
            window.add_latency("incumbent", incumbent_ms)


def _versus(
    p: NDArray[np.float64], log_p: NDArray[np.float64], scores: NDArray[Any], kind: OutputKind
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """A version's top-1 class, top-1 probability and KL(teacher || version) per row, in nats
    (the maths of `monitoring.fidelity.compare`)."""
    log_q = log_probabilities(scores, kind)
    top1 = log_q.argmax(axis=1).astype(np.int64)
    confidence = np.exp(log_q.max(axis=1))
    kl = np.maximum((p * (log_p - log_q)).sum(axis=1), 0.0)
    return top1, confidence, kl


def _row_abs_error(values: NDArray[Any], teacher: NDArray[Any], rows: int) -> NDArray[np.float64]:
    """Mean |version - teacher| per row (over every value of a row's output)."""
    error = np.abs(np.asarray(values, np.float64) - np.asarray(teacher, np.float64))
    result: NDArray[np.float64] = error.reshape(rows, -1).mean(axis=1)
    return result
