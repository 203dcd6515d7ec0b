"""What the app serves: the configured models, their routers once loaded, and readiness.

The names and versions come from the settings at construction, so unknown models answer 404
and known ones 503 while loading. `load` builds every student session (sha256 verified), warms
it up and only then flips `ready`; it blocks, so the lifespan runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable

from kdgate.monitoring.metrics import Metrics
from kdgate.service.errors import ModelNotFound, NotReady
from kdgate.service.routing import RequestCounters, Router, Variant
from kdgate.service.runtime import StudentSession
from kdgate.service.settings import ServerSettings, Settings, StudentSettings

StudentLoader = Callable[[StudentSettings, ServerSettings], StudentSession]


def load_student(student: StudentSettings, server: ServerSettings) -> StudentSession:
    """The default loader: the card's ONNX file, verified, with the configured thread counts."""
    return StudentSession.from_card(
        student.card,
        intra_op_threads=server.onnx_intra_op_threads,
        inter_op_threads=server.onnx_inter_op_threads,
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
        self.ready = False
        # Requests that never reached a variant (unknown model, not ready) are still counted,
        # under version "" (and model "" when the name is unknown: no unbounded label values).
        # Bound lazily: these are rare, and zero series for them would only add noise.
        self._unrouted = {
            name: RequestCounters(metrics, name, "", prebind=False) for name in [*self.versions, ""]
        }

    def load(self, loader: StudentLoader = load_student) -> None:
        """Load, check and warm every student; then mark the state ready (blocking)."""
        server = self.settings.server
        routers: dict[str, Router] = {}
        for model in self.settings.models:
            variants: dict[str, Variant] = {}
            for student in model.students:
                session = loader(student, server)
                variants[student.version] = Variant(
                    model.name,
                    session,
                    student.version,
                    self.metrics,
                    batch_max_rows=server.batch_max_rows,
                )
            first = next(iter(variants.values())).signature
            if any(v.signature != first for v in variants.values()):
                raise ValueError(f"model {model.name!r}: students disagree on the signature")
            for variant in variants.values():
                variant.session.warm_up(server.warmup_runs)
            routers[model.name] = Router.from_traffic(model.name, variants, model.traffic)
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

    def unrouted(self, model: str) -> RequestCounters:
        """Counters for a request that no variant served."""
        return self._unrouted.get(model, self._unrouted[""])
