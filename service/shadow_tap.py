"""The request-path hook of one model: keep every prediction for feedback, shadow a fraction.

`ModelShadow.observe_many` is what the monitoring runtime calls for each settled batch of the
request log (service/request_log.py), on the event loop: remember each prediction in the model's
feedback store, and for a deterministic fraction of request ids offer (every input by name, the
student's scores output, the request span's context) to the bounded shadow queue without waiting.
Everything else runs in the shadow worker and the teacher's thread (monitoring/shadow.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.shadow import ShadowQueue, ShadowSample, should_shadow

log = logging.getLogger(__name__)

Arrays = Mapping[str, Any]


class ModelShadow:
    """Keeps every prediction of one model, shadows a fraction of them.

    `shadow_fraction` returns the model's current fraction: the traffic admin API swaps the
    model's router (and with it the fraction) at run time, so it is read once per batch.
    `scores_name` is the student's output compared with the teacher (`cards.scores_output`);
    with None (no such output) nothing is kept or shadowed.
    """

    __slots__ = ("feedback", "queue", "scores_name", "shadow_fraction")

    def __init__(
        self,
        feedback: FeedbackStore,
        queue: ShadowQueue | None,
        *,
        shadow_fraction: Callable[[], float],
        scores_name: str | None,
    ) -> None:
        self.feedback = feedback
        self.queue = queue
        self.shadow_fraction = shadow_fraction
        self.scores_name = scores_name

    @property
    def fraction(self) -> float:
        """The shadow fraction in force now."""
        return self.shadow_fraction() if self.queue is not None else 0.0

    def observe(
        self, request_id: str, version: str, inputs: Arrays, outputs: Arrays, trace: Any = None
    ) -> None:
        """One successful prediction; see `observe_many`."""
        self.observe_many([request_id], [version], [inputs], [outputs], [trace])

    def observe_many(
        self,
        request_ids: Sequence[str],
        versions: Sequence[str],
        inputs: Sequence[Arrays],
        outputs: Sequence[Arrays],
        traces: Sequence[Any],
    ) -> None:
        """Successful predictions, oldest first, as columns (entry i of each is prediction i;
        a trace is the request span's context or None): never awaits, never raises on a full
        queue.

        The shadow fraction is read once per call: the predictions of one settle (at most
        ~10 ms of traffic, service/request_log.py) share it.
        """
        name = self.scores_name
        if name is None:
            return
        try:
            scores = list(map(itemgetter(name), outputs))
            queue = self.queue
            fraction = self.shadow_fraction() if queue is not None else 0.0
            shadowed = None
            if fraction and queue is not None:
                shadowed = [
                    should_shadow(request_id, fraction)
                    and queue.offer(ShadowSample(request_id, version, arrays, score, trace))
                    for request_id, version, arrays, score, trace in zip(
                        request_ids, versions, inputs, scores, traces, strict=True
                    )
                ]
            self.feedback.put_columns(request_ids, versions, scores, shadowed)
        except Exception:  # monitoring must never fail the answer already computed
            log.exception("shadow/feedback hook failed for %d predictions", len(request_ids))
