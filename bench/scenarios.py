"""Benchmark scenarios: which server, with which config, beside which helper process.

A scenario is a name, a server kind ("ceiling", "naive" or "kdgate"), for kdgate the overrides
deep-merged into the generated config, and optionally a sidecar: a process started before the
server (a remote teacher, possibly slow) or a port reserved with nothing listening ("teacher
down"). Every scenario gets the same model, payload and load phases, so any two can be compared.

Placeholders in override values are filled in per run:
    {student_card}  {teacher_card}  the model cards in use (stand-ins until models/ has them)
    {sidecar_url}   http://127.0.0.1:PORT of the sidecar (or of the closed port)

Adding a scenario = one entry in a tuple below (and, to assert something, one `Comparison` in
bench/report.py). `SHADOW` and `DRIFT` are written against DESIGN.md's config names and are run
with `--only NAME`; move them into `DEFAULT` once kdgate serves the features they exercise.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.workloads import WorkloadName

ServerKind = Literal["ceiling", "naive", "kdgate"]


@dataclass(frozen=True)
class Sidecar:
    """A remote V2 teacher served by `bench.ceiling` beside the server under test."""

    model: Literal["teacher", "student"] = "teacher"
    name: str = "digits-teacher"  # model name in its URL
    delay_ms: float = 0.0  # added to every infer: a slow teacher
    running: bool = True  # False: reserve a port and start nothing (teacher down)


@dataclass(frozen=True)
class Scenario:
    """One server configuration to measure."""

    name: str
    server: ServerKind
    description: str
    config: Mapping[str, Any] = field(default_factory=dict)  # merged into the kdgate config root
    model: Mapping[str, Any] = field(default_factory=dict)  # merged into its `models[0]` entry
    sidecar: Sidecar | None = None
    workload: WorkloadName = "digits"  # the model pair and request (bench/workloads.py)
    # Server processes. Above 1 the server is not pinned to `--server-core`: its workers need
    # the cores the scheduler gives them, the same for kdgate and the ceiling in one run.
    workers: int = 1


DEFAULT: tuple[Scenario, ...] = (
    Scenario("ceiling", "ceiling", "bare ASGI + orjson + onnxruntime (uvicorn, httptools, uvloop)"),
    Scenario("naive", "naive", "FastAPI + pydantic V2 models, async handler"),
    Scenario("kdgate", "kdgate", "kdgate serve, default config, shadow off"),
    # Scaling on one host: kdgate's 2-worker/1-worker throughput against the ceiling's.
    Scenario(
        "ceiling-2-workers", "ceiling", "the ceiling in 2 uvicorn worker processes", workers=2
    ),
    Scenario("kdgate-2-workers", "kdgate", "kdgate serve --workers 2, shadow off", workers=2),
)

_SHADOW_TRAFFIC = {"weights": {"1": 100}}

SHADOW: tuple[Scenario, ...] = (
    Scenario(
        "kdgate-shadow-10-local",
        "kdgate",
        "shadow 10% to the local ONNX teacher",
        model={
            "teacher": {"card": "{teacher_card}"},
            "traffic": {**_SHADOW_TRAFFIC, "shadow_fraction": 0.1},
        },
    ),
    Scenario(
        "kdgate-shadow-100-local",
        "kdgate",
        "shadow 100% to the local ONNX teacher",
        model={
            "teacher": {"card": "{teacher_card}"},
            "traffic": {**_SHADOW_TRAFFIC, "shadow_fraction": 1.0},
        },
    ),
    Scenario(
        "kdgate-shadow-100-slow-remote",
        "kdgate",
        "shadow 100% to a remote teacher that takes 200 ms per call",
        model={
            "teacher": {"url": "{sidecar_url}", "model": "digits-teacher"},
            "traffic": {**_SHADOW_TRAFFIC, "shadow_fraction": 1.0},
        },
        sidecar=Sidecar(delay_ms=200.0),
    ),
    Scenario(
        "kdgate-shadow-100-teacher-down",
        "kdgate",
        "shadow 100% to a remote teacher whose port is closed",
        model={
            "teacher": {"url": "{sidecar_url}", "model": "digits-teacher"},
            "traffic": {**_SHADOW_TRAFFIC, "shadow_fraction": 1.0},
        },
        sidecar=Sidecar(running=False),
    ),
)

# Input drift: fill in the config keys of the drift job once it exists (issue 5), e.g. a
# drift run every few seconds so that the rate phase overlaps one, then compare its
# rate.p95_ms with the "kdgate" scenario's.
DRIFT: tuple[Scenario, ...] = ()

# A heavier student (bench/workloads.py): kdgate against the ceiling on the same text model, one
# row and 32 rows per request, where the model's run is most of the work.
TEXT: tuple[Scenario, ...] = (
    Scenario("ceiling-text-b1", "ceiling", "bare ASGI ceiling, 1 text row", workload="text-b1"),
    Scenario("kdgate-text-b1", "kdgate", "kdgate serve, 1 text row", workload="text-b1"),
    Scenario("ceiling-text-b32", "ceiling", "bare ASGI ceiling, 32 text rows", workload="text-b32"),
    Scenario("kdgate-text-b32", "kdgate", "kdgate serve, 32 text rows", workload="text-b32"),
)

ALL: tuple[Scenario, ...] = DEFAULT + SHADOW + DRIFT + TEXT


def select(names: list[str] | None) -> list[Scenario]:
    """The scenarios to run: DEFAULT, or exactly the named ones (any of ALL) in the given order."""
    if not names:
        return list(DEFAULT)
    by_name = {scenario.name: scenario for scenario in ALL}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in names]


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def fill(value: Any, placeholders: Mapping[str, str]) -> Any:
    """`value` with every `{name}` in its strings (at any depth) replaced from `placeholders`."""
    if isinstance(value, str):
        for name, replacement in placeholders.items():
            value = value.replace("{" + name + "}", replacement)
        return value
    if isinstance(value, Mapping):
        return {key: fill(item, placeholders) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [fill(item, placeholders) for item in value]
    return value


def kdgate_config(
    scenario: Scenario,
    *,
    port: int,
    student_card: str,
    placeholders: Mapping[str, str],
    model_name: str = "digits",
) -> dict[str, Any]:
    """The kdgate YAML config (as a dict) for `scenario`: one model, one student, its overrides."""
    baseline = {
        "name": model_name,
        "students": [{"version": "1", "card": student_card}],
        # Explicitly off: kdgate's default fraction is not 0, and the baseline has no teacher.
        "traffic": {"shadow_fraction": 0.0},
    }
    model = deep_merge(baseline, fill(scenario.model, placeholders))
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if scenario.workers > 1:
        server["workers"] = scenario.workers
    base = {"server": server, "models": [model]}
    return deep_merge(base, fill(scenario.config, placeholders))
