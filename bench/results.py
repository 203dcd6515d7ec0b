"""What one benchmark run measures, as plain records that serialize to the results JSON."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadResult:
    """One load-generator phase as the client saw it. Latencies in milliseconds."""

    tool: str  # "wrk" or "k6"
    requests: int
    duration_s: float
    failed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    dropped: int = 0  # k6: iterations it could not start at the target rate

    @property
    def rps(self) -> float:
        """Requests completed per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Phase:
    """A load phase plus what the server, the load generator and their cores spent on it."""

    load: LoadResult
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float  # the load generator's own CPU
    server_core_busy_s: float | None  # everything the server's core did, the server included
    client_core_busy_s: float | None

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU time per completed request, in microseconds."""
        return 1e6 * self.server_cpu_s / self.load.requests if self.load.requests else 0.0

    @property
    def server_core_noise(self) -> float | None:
        """Share of the server's core used by other processes during the phase (0..1)."""
        return _noise(self.server_core_busy_s, self.server_cpu_s, self.wall_s)

    @property
    def client_core_noise(self) -> float | None:
        """Share of the load generator's core used by other processes during the phase (0..1)."""
        return _noise(self.client_core_busy_s, self.client_cpu_s, self.wall_s)

    def to_dict(self) -> dict[str, Any]:
        server_noise, client_noise = self.server_core_noise, self.client_core_noise
        return {
            **asdict(self.load),
            "rps": round(self.load.rps, 1),
            "wall_s": round(self.wall_s, 3),
            "server_cpu_s": round(self.server_cpu_s, 3),
            "client_cpu_s": round(self.client_cpu_s, 3),
            "cpu_us_per_request": round(self.cpu_us_per_request, 1),
            "server_core_noise": None if server_noise is None else round(server_noise, 3),
            "client_core_noise": None if client_noise is None else round(client_noise, 3),
        }


def _noise(core_busy_s: float | None, own_cpu_s: float, wall_s: float) -> float | None:
    if core_busy_s is None or wall_s <= 0:
        return None
    return max(core_busy_s - own_cpu_s, 0.0) / wall_s


@dataclass
class ScenarioResult:
    """Everything measured for one scenario; `error` is set when it could not be measured."""

    name: str
    server: str
    description: str
    phases: dict[str, Phase] = field(default_factory=dict)  # "c16", "c1", "rate"
    rss_kib: int = 0
    hwm_kib: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def metric(self, key: str) -> float | None:
        """A figure by dotted key, e.g. "c16.rps", "c1.p50_ms", "rate.p95_ms", "rss_mib"."""
        if key == "rss_mib":
            return self.rss_kib / 1024 if self.rss_kib else None
        phase_name, _, attribute = key.partition(".")
        phase = self.phases.get(phase_name)
        if phase is None:
            return None
        value = phase.to_dict().get(attribute)
        return float(value) if isinstance(value, int | float) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "server": self.server,
            "description": self.description,
            "phases": {name: phase.to_dict() for name, phase in self.phases.items()},
            "rss_mib": round(self.rss_kib / 1024, 1),
            "peak_rss_mib": round(self.hwm_kib / 1024, 1),
            "error": self.error,
            "notes": self.notes,
        }


def median_phase(phases: list[Phase]) -> Phase:
    """A Phase whose every raw figure is the median of `phases`' (for --repeat)."""
    loads = [phase.load for phase in phases]

    def mid(values: list[float]) -> float:
        return float(statistics.median(values))

    load = LoadResult(
        tool=loads[0].tool,
        requests=round(mid([x.requests for x in loads])),
        duration_s=mid([x.duration_s for x in loads]),
        failed=round(mid([x.failed for x in loads])),
        p50_ms=mid([x.p50_ms for x in loads]),
        p95_ms=mid([x.p95_ms for x in loads]),
        p99_ms=mid([x.p99_ms for x in loads]),
        max_ms=mid([x.max_ms for x in loads]),
        dropped=round(mid([x.dropped for x in loads])),
    )
    return Phase(
        load=load,
        wall_s=mid([p.wall_s for p in phases]),
        server_cpu_s=mid([p.server_cpu_s for p in phases]),
        client_cpu_s=mid([p.client_cpu_s for p in phases]),
        server_core_busy_s=_mid_optional([p.server_core_busy_s for p in phases]),
        client_core_busy_s=_mid_optional([p.client_core_busy_s for p in phases]),
    )


def _mid_optional(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(statistics.median(present)) if present else None


def median_result(runs: list[ScenarioResult]) -> ScenarioResult:
    """One scenario's repeats folded into medians; failed repeats are left out."""
    good = [run for run in runs if run.error is None]
    first = runs[0]
    if not good:
        return first
    merged = ScenarioResult(first.name, first.server, first.description)
    for name in good[0].phases:
        phases = [run.phases[name] for run in good if name in run.phases]
        merged.phases[name] = median_phase(phases)
    merged.rss_kib = round(statistics.median(run.rss_kib for run in good))
    merged.hwm_kib = round(statistics.median(run.hwm_kib for run in good))
    merged.notes = [note for run in runs for note in run.notes]
    merged.notes += [f"repeat failed: {run.error}" for run in runs if run.error]
    return merged
