"""Measure one scenario: start its sidecar and server, check one answer, run the load phases.

Phases, in order, each against the same payload:
    warm-up  wrk, N connections, discarded (JIT-free Python still warms caches and pools)
    c16      wrk, N connections (closed loop): throughput and server CPU per request
    c1       wrk, 1 connection: unloaded latency p50/p95/p99
    rate     k6 constant-arrival-rate: latency at a fixed offered load, failed requests
The server runs pinned to `server_core`, the load generators to `client_core`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import k6, procstat, servers, wrk
from bench.results import LoadResult, Phase, ScenarioResult
from bench.scenarios import Scenario, kdgate_config
from bench.workloads import Workload, WorkloadName


@dataclass(frozen=True)
class Settings:
    """What every scenario of a run shares."""

    workdir: Path
    workloads: Mapping[WorkloadName, Workload]  # every workload a chosen scenario uses
    duration_s: float
    warmup_s: float
    connections: int
    rate: int
    server_core: int | None
    client_core: int | None
    use_k6: bool


def measure(scenario: Scenario, settings: Settings) -> ScenarioResult:
    """Run every phase for `scenario`; failures are recorded in the result, not raised."""
    result = ScenarioResult(scenario.name, scenario.server, scenario.description)
    try:
        with contextlib.ExitStack() as stack:
            work = settings.workloads[scenario.workload]
            port = servers.free_port()
            command = _server_command(scenario, work, settings, port, stack)
            log = settings.workdir / f"{scenario.name}.log"
            core = settings.server_core if scenario.workers == 1 else None
            proc = stack.enter_context(servers.running(command, port=port, core=core, log=log))
            url = f"http://127.0.0.1:{port}{work.infer_path}"
            servers.check_answer(url, work.body, work.expected)
            _phases(result, url, work.body, proc.pid, settings)
            result.rss_kib, result.hwm_kib = procstat.memory_kib(proc.pid)
    except Exception as exc:  # one broken scenario must not hide the others' figures
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _server_command(
    scenario: Scenario,
    work: Workload,
    settings: Settings,
    port: int,
    stack: contextlib.ExitStack,
) -> list[str]:
    """The command for the scenario's server, after starting its sidecar if it has one."""
    if scenario.server in ("ceiling", "naive"):
        command = servers.bench_server_command(scenario.server, work.student.onnx, work.model)
        return command + (["--workers", str(scenario.workers)] if scenario.workers > 1 else [])
    placeholders = {
        "student_card": str(work.student.card),
        "teacher_card": str(work.teacher.card),
    }
    if scenario.sidecar is not None:
        sidecar_port = servers.free_port()
        placeholders["sidecar_url"] = f"http://127.0.0.1:{sidecar_port}"
        if scenario.sidecar.running:
            files = work.teacher if scenario.sidecar.model == "teacher" else work.student
            sidecar = servers.bench_server_command(
                "ceiling", files.onnx, scenario.sidecar.name, scenario.sidecar.delay_ms
            )
            # The sidecar stands for a remote machine: keep it off the server's core, and let
            # the load generator it shares a core with preempt it (nice 19). At normal priority
            # its ~8 ms teacher runs per batch held k6 off the core and showed up as the
            # server's p95 (k6 max latency 20-40 ms; 6-8 ms at nice 19; docs/benchmarks.md).
            log = settings.workdir / f"{scenario.name}-sidecar.log"
            stack.enter_context(
                servers.running(
                    ["nice", "-n", "19", *sidecar],
                    port=sidecar_port,
                    core=settings.client_core,
                    log=log,
                )
            )
    config = kdgate_config(
        scenario,
        port=port,
        student_card=str(work.student.card),
        placeholders=placeholders,
        model_name=work.model,
    )
    config_path = settings.workdir / f"{scenario.name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [*servers.kdgate_command(), "serve", "--config", str(config_path)]


def _phases(result: ScenarioResult, url: str, body: bytes, pid: int, settings: Settings) -> None:
    client = servers.pin(settings.client_core)
    script = settings.workdir / "post.lua"
    script.write_text(wrk.lua_script(body))
    body_file = settings.workdir / "body.json"
    body_file.write_bytes(body)

    def closed_loop(connections: int, seconds: float) -> Callable[[], LoadResult]:
        return lambda: wrk.run(url, script, connections=connections, duration_s=seconds, pin=client)

    closed_loop(settings.connections, settings.warmup_s)()
    many = closed_loop(settings.connections, settings.duration_s)
    result.phases["c16"] = _observed(pid, settings, many)
    result.phases["c1"] = _observed(pid, settings, closed_loop(1, settings.duration_s))
    if settings.use_k6:
        result.phases["rate"] = _observed(
            pid,
            settings,
            lambda: k6.run(
                url,
                body_file,
                settings.workdir,
                rate=settings.rate,
                duration_s=settings.duration_s,
                pin=client,
            ),
        )
    for name, phase in result.phases.items():
        if phase.load.failed or phase.load.dropped:
            result.notes.append(
                f"{name}: {phase.load.failed} failed, {phase.load.dropped} dropped requests"
            )


def _observed(pid: int, settings: Settings, load: Callable[[], LoadResult]) -> Phase:
    """Run `load` and attribute CPU (the server's, the load generator's, their cores') to it."""
    cores = (settings.server_core, settings.client_core)
    before, started = procstat.sample(pid, cores), time.monotonic()
    outcome = load()
    after, wall = procstat.sample(pid, cores), time.monotonic() - started
    server_core, client_core = (
        None if b is None or a is None else a - b
        for b, a in zip(before.cores_busy_s, after.cores_busy_s, strict=True)
    )
    return Phase(
        load=outcome,
        wall_s=wall,
        server_cpu_s=after.process_cpu_s - before.process_cpu_s,
        client_cpu_s=after.children_cpu_s - before.children_cpu_s,
        server_core_busy_s=server_core,
        client_core_busy_s=client_core,
    )
