"""What the app serves: the configured models, their routers once loaded, and readiness.

The names and versions come from the settings at construction, so unknown models answer 404
and known ones 503 while loading. `load` builds every student version with the app's
`VariantFactory` (the same one the admin API loads versions with), warms them up and only then
flips `ready`; it blocks, so the lifespan runs it in a worker thread. A version with weight 0
that fails to load (its card deleted) is left out and listed in `not_loaded`; one with a share
of the traffic stops the start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kdgate.monitoring.metrics import Metrics
from kdgate.service.errors import InvalidInput, ModelNotFound, NotReady
from kdgate.service.request_metrics import RequestMetrics
from kdgate.service.routing import Router, Variant
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import ServerSettings, Settings, StudentSettings
from kdgate.service.tensors import Signature
from kdgate.service.tracer import NO_TRACER, Tracer

log = logging.getLogger(__name__)

StudentLoader = Callable[[StudentSettings, ServerSettings], StudentSession]


def load_student(student: StudentSettings, server: ServerSettings) -> StudentSession:
    """The default loader: the card's ONNX file, verified, on the student's providers with its
    session options (thread counts: the server's unless the student sets them)."""
    return StudentSession.from_card(
        student.card,
        intra_op_threads=server.onnx_intra_op_threads,
        inter_op_threads=server.onnx_inter_op_threads,
        providers=student.providers,
        provider_options=dict(student.provider_options),
        config=student.session_options,
    )


class VariantFactory:
    """Builds every student version of the app, at start and through the admin API alike.

    `loader` makes the session (tests inject slow or failing ones); `tracer` wraps its `run` in a
    span (and then no micro-batcher shares runs: one span per request's run); `request_metrics`
    creates the version's request series so they export at 0 before its first request;
    `metrics` receives the micro-batcher's histograms.
    """

    def __init__(
        self,
        server: ServerSettings,
        *,
        loader: StudentLoader = load_student,
        tracer: Tracer = NO_TRACER,
        request_metrics: RequestMetrics | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.loader = loader
        self.tracer = tracer
        self.request_metrics = request_metrics

    def __call__(
        self, model: str, student: StudentSettings, *, signature: Signature | None = None
    ) -> Variant:
        """Load (blocking) the session of `student` and make it a variant of `model`; refuse
        (InvalidInput) one whose inputs/outputs differ from `signature` when given."""
        session = self.loader(student, self.server)
        version = student.version
        if signature is not None and session.signature != signature:
            raise InvalidInput(
                f"version {version!r} refused: its inputs/outputs "
                f"{session.card.inputs + session.card.outputs} differ from model {model!r}'s"
            )
        if self.request_metrics is not None:
            self.request_metrics.bind(model, version)
        return Variant(
            model,
            session,
            version,
            batch_max_rows=1 if self.tracer.enabled else self.server.batch_max_rows,
            run=self.tracer.student_run(model, version, session.run),
            metrics=self.metrics,
        )


class ServingState:
    """The served models and whether they can answer yet."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.versions: dict[str, list[str]] = {
            m.name: [s.version for s in m.students] for m in settings.models
        }
        self.routers: dict[str, Router] = {}
        # model -> version -> why it is configured but not served (weight 0, failed to load)
        self.not_loaded: dict[str, dict[str, str]] = {m.name: {} for m in settings.models}
        self.ready = False

    def load(self, build: VariantFactory) -> None:
        """Build, check and warm every student; then mark the state ready (blocking)."""
        server = self.settings.server
        routers: dict[str, Router] = {}
        for model in self.settings.models:
            variants: dict[str, Variant] = {}
            for student in model.students:
                share = model.traffic.weights.get(student.version, 0)
                try:
                    variants[student.version] = build(model.name, student)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    if share:
                        exc.add_note(
                            f"model {model.name!r}: version {student.version!r} takes {share}% "
                            f"of the traffic but cannot be loaded from {student.card}"
                        )
                        raise
                    # Reachable by nothing (weight 0): serve the others rather than nothing.
                    log.warning(
                        "model %s: version %s (weight 0) not loaded from %s: %s",
                        model.name,
                        student.version,
                        student.card,
                        reason,
                    )
                    self.not_loaded[model.name][student.version] = reason
            first = next(iter(variants.values())).signature
            if any(v.signature != first for v in variants.values()):
                raise ValueError(f"model {model.name!r}: students disagree on the signature")
            for variant in variants.values():
                variant.session.warm_up(server.warmup_runs)
            weights = {v: w for v, w in model.traffic.weights.items() if v in variants}
            traffic = model.traffic.model_copy(update={"weights": weights})
            routers[model.name] = Router.from_traffic(model.name, variants, traffic)
        self.routers = routers
        self.ready = True

    def router(self, model: str) -> Router:
        """The loaded router of `model`: 404 when unknown, 503 while loading."""
        router = self.routers.get(model)
        if router is not None:
            return router
        self.check_version(model, None)
        raise NotReady(f"model {model!r} is loading; retry when /v2/health/ready says ready")

    def check_version(self, model: str, version: str | None) -> None:
        """404 for a version that is not configured, even while loading."""
        if model not in self.versions:
            raise ModelNotFound(
                f"unknown model {model!r}; this server serves {list(self.versions)}"
            )
        if version is not None and version not in self.versions[model]:
            raise ModelNotFound(
                f"model {model!r} has no version {version!r}; versions: {self.versions[model]}"
            )
