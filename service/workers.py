"""`kdgate serve --workers N`: a supervisor process and N workers serving the same port(s).

    supervisor                       binds server.port (and server.admin_port), makes the run
    │                                directory of the private sockets (0700), starts the workers,
    │                                restarts one that dies, forwards SIGTERM/SIGINT
    ├── worker 0   uvicorn + the app  on the inherited sockets, plus <run dir>/worker-0.sock
    └── worker 1   ...               (service/siblings.py)

The workers are spawned (not forked: the supervisor's state is not copied into them) and accept
on the same listening sockets, so the kernel spreads connections over them, as uvicorn's and
gunicorn's workers do. Each worker is a whole kdgate app (models, shadow, feedback, SLO monitor);
what must happen once per host (drift job, webhook sender, retrain requests) runs on the worker
holding the host's leader lock (service/leader.py). All workers follow the one traffic file
(`traffic.file`, by default `<admin.state_dir>/traffic.json`), so an admin change made through
any worker reaches every worker within `traffic.poll_seconds`.

Restarts: a worker that dies is started again after a backoff (0.5 s doubling to 10 s; reset once
a worker becomes ready). If workers die `START_FAILURES` times in a row before ever becoming
ready (a bad model file, a port taken), the supervisor stops the others and exits 1.
Shutdown: SIGTERM or SIGINT is passed to every worker, which drains like a single `kdgate serve`;
workers still running after `server.graceful_shutdown_seconds` + `STOP_MARGIN_SECONDS` are
killed and the exit code is 1, else 0.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from kdgate.service.listeners import PortSplit, bind
from kdgate.service.settings import Settings

log = logging.getLogger("uvicorn.error")  # beside uvicorn's own lines, in the same format

GIL_SWITCH_INTERVAL_SECONDS = 0.0002  # CPython's default is 0.005
BACKLOG = 2048  # uvicorn's default
START_FAILURES = 3  # deaths in a row before any worker became ready: give up
BACKOFF_SECONDS = (0.5, 10.0)  # first and longest wait before a restart
STOP_MARGIN_SECONDS = 35.0  # after the HTTP drain: the monitoring runtime's stop (30 s at most)
TICK_SECONDS = 0.2
LEADER_LOCK = "leader.lock"


def uvicorn_config(settings: Settings, app: Any, host: str, port: int) -> uvicorn.Config:
    """The uvicorn config of `kdgate serve` for `app` (one process or one worker)."""
    from kdgate.service.logs import AccessLog, log_config

    server = settings.server
    return uvicorn.Config(
        AccessLog(app) if server.access_log else app,  # off: no access-log code per request
        host=host,
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # applied by the app itself, outside the inference fast path
        log_level=server.log_level,
        # Without it only uvicorn's loggers have a handler, and kdgate's INFO lines (the admin
        # audit trail above all) would be dropped.
        log_config=log_config(server.log_level, server.log_format),
        timeout_graceful_shutdown=server.graceful_shutdown_seconds,
    )


def tune_interpreter() -> None:
    """Per serving process: the teachers' worker threads (monitoring/teacher.py) run Python too
    (encoding, httpx): when one holds the GIL, the event loop gets it back within this time
    instead of CPython's default 5 ms, which the student's latency tail would otherwise show.
    Only contended hand-offs are affected: with no teacher thread busy, nothing changes."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start (pickled to the spawned process)."""

    config: Path | None
    host: str
    port: int  # the bound port (the real one when 0 was asked)
    admin_port: int | None
    index: int
    count: int
    run_dir: Path
    lock: Path
    parent: int  # the supervisor's pid: a worker whose parent is gone stops


def serve_workers(config: Path | None, settings: Settings, host: str, port: int) -> int:
    """Run `settings.server.workers` workers on (host, port) until SIGTERM/SIGINT; the exit code."""
    from kdgate.service.logs import log_config

    server = settings.server
    logging.config.dictConfig(log_config(server.log_level, server.log_format))
    sockets = [bind(host, port)]
    if server.admin_port is not None:
        try:
            sockets.append(bind(host, server.admin_port))
        except BaseException:
            sockets[0].close()
            raise
    for sock in sockets:
        sock.listen(BACKLOG)  # connections wait in the backlog until a worker accepts
    settings.admin.state_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="kdgate-workers-"))  # 0700, short for AF_UNIX paths
    try:
        spec = WorkerSpec(
            config=config,
            host=host,
            port=sockets[0].getsockname()[1],
            admin_port=sockets[1].getsockname()[1] if len(sockets) > 1 else None,
            index=0,
            count=server.workers,
            run_dir=run_dir,
            lock=settings.admin.state_dir / LEADER_LOCK,
            parent=os.getpid(),
        )
        stop_seconds = server.graceful_shutdown_seconds + STOP_MARGIN_SECONDS
        return Supervisor(spec, sockets, stop_seconds=stop_seconds).run()
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)


class Supervisor:
    """Starts, watches and stops the workers (see the module docstring)."""

    def __init__(
        self, spec: WorkerSpec, sockets: list[socket.socket], *, stop_seconds: float
    ) -> None:
        self.spec = spec
        self.sockets = sockets
        self.stop_seconds = stop_seconds
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[SpawnProcess, Event] | None] = [None] * spec.count
        self._due = [0.0] * spec.count  # when each empty slot is started again
        self._failures = 0  # deaths in a row before becoming ready
        self._backoff = BACKOFF_SECONDS[0]
        self._signal: int | None = None
        self._announced = False
        self._own: set[int] | None = None  # children that are not orphans (None: not tracked)

    def run(self) -> int:
        subreaper = _become_subreaper()
        with self._signals():
            for index in range(self.spec.count):
                self._start(index)
            # What else is a child now (multiprocessing's resource tracker) is not an orphan.
            if subreaper:
                self._own = _children() | {p.pid for p in self._live if p.pid is not None}
            while self._signal is None:
                if not self._watch():
                    self._stop_all()
                    return 1
                time.sleep(TICK_SECONDS)
            log.info("%s: stopping %d workers", signal.Signals(self._signal).name, len(self._live))
            return 0 if self._stop_all() else 1

    @property
    def _live(self) -> list[SpawnProcess]:
        return [w[0] for w in self._workers if w is not None and w[0].is_alive()]

    def _start(self, index: int) -> None:
        spec = WorkerSpec(**{**self.spec.__dict__, "index": index})
        ready = self._context.Event()
        process = self._context.Process(
            target=run_worker, args=(spec, self.sockets, ready), name=f"kdgate-worker-{index}"
        )
        process.start()
        self._workers[index] = (process, ready)
        log.info("worker %d started (pid %s)", index, process.pid)

    def _watch(self) -> bool:
        """One look at every worker: restart the dead; False to give up."""
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if worker is None:
                if now >= self._due[index]:
                    self._start(index)
                continue
            process, ready = worker
            if process.is_alive():
                continue
            started = ready.is_set()
            self._workers[index] = None
            self._end_orphans()
            self._failures = 0 if started else self._failures + 1
            if started:
                self._backoff = BACKOFF_SECONDS[0]
            if self._failures >= START_FAILURES:
                log.error(
                    "workers died %d times in a row before serving (last: worker %d, exit %s); "
                    "stopping",
                    self._failures,
                    index,
                    process.exitcode,
                )
                return False
            log.error(
                "worker %d (pid %s) exited with %s; restarting it in %.1f s",
                index,
                process.pid,
                process.exitcode,
                self._backoff,
            )
            self._due[index] = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_SECONDS[1])
        if not self._announced and all(w is not None and w[1].is_set() for w in self._workers):
            self._announced = True
            host, port = self.spec.host, self.spec.port
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            # uvicorn's own wording: scripts and tests look for it.
            log.info("Uvicorn running on %s (Press CTRL+C to quit)", url)
            if self.spec.admin_port is not None:
                log.info("admin, metrics and hooks on port %d", self.spec.admin_port)
            log.info("%d workers; private sockets in %s", self.spec.count, self.spec.run_dir)
        return True

    def _end_orphans(self) -> None:
        """Kill and reap what dead workers left behind (their children, now ours)."""
        if self._own is None:
            return
        live = {p.pid for p in self._live if p.pid is not None}
        for pid in _children() - self._own - live:
            log.warning("ending pid %d, left behind by a dead worker", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

    def _stop_all(self) -> bool:
        """SIGTERM every worker; SIGKILL those left at the deadline. True if none was."""
        for process in self._live:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_seconds
        while self._live and time.monotonic() < deadline:
            time.sleep(TICK_SECONDS)
        left = self._live
        for process in left:
            log.error(
                "worker pid %s did not stop in %.0f s: killed", process.pid, self.stop_seconds
            )
            process.kill()
            process.join(5)
        self._end_orphans()
        return not left

    @contextmanager
    def _signals(self) -> Generator[None, None, None]:
        def note(sig: int, _: Any) -> None:
            if self._signal is None:
                self._signal = sig

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _become_subreaper() -> bool:
    """Make orphaned descendants this process's children (Linux prctl); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)


def _children() -> set[int]:
    """The pids whose parent is this process (from /proc; empty where there is none)."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.add(int(entry.parent.name))
    return found


# -- the worker process -------------------------------------------------------------------------


class _WorkerServer(uvicorn.Server):
    """uvicorn on the supervisor's sockets; tells the supervisor once it serves."""

    def __init__(self, config: uvicorn.Config, ready: Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()


class _PrivateServer(uvicorn.Server):
    """uvicorn on the worker's private socket, in the worker's loop: the main server owns the
    signals, and stops this one after its own drain."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def run_worker(spec: WorkerSpec, sockets: list[socket.socket], ready: Event) -> None:
    """A worker's whole life (the spawned process's target)."""
    from kdgate.service.app import create_app
    from kdgate.service.configcheck import load_checked
    from kdgate.service.leader import HostLeader
    from kdgate.service.siblings import Place, Siblings, private_app

    _stop_with_parent(spec.parent)
    settings = load_checked(spec.config)
    tune_interpreter()
    registry = CollectorRegistry()
    place = Place(spec.index, spec.count, spec.run_dir)
    leader = HostLeader(spec.lock, name=f"worker {spec.index}")
    siblings = Siblings(place, leader, registry)
    app = create_app(settings, registry=registry, siblings=siblings)
    if spec.admin_port is not None:
        app.ports = PortSplit(spec.admin_port)
    config = uvicorn_config(settings, app, spec.host, spec.port)
    private = _private_socket(place.socket(spec.index))

    async def join(model: str, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        from kdgate.service.fidelity_api import join_feedback

        monitoring = app.state.monitoring.model(model)
        if monitoring is None:
            return None
        answer: dict[str, Any] = await join_feedback(monitoring, app.state.request_log, items)
        return answer

    def drift_html(model: str) -> bytes | None:
        job = app.state.monitoring.drift_jobs.get(model)
        return None if job is None else job.latest_html

    private_config = uvicorn.Config(
        private_app(place, leader, registry, join, drift_html),
        lifespan="off",
        access_log=False,
        log_config=None,  # the main config set logging up
        timeout_graceful_shutdown=2,
    )

    async def serve() -> None:
        inner = _PrivateServer(private_config)
        side = asyncio.create_task(inner.serve(sockets=[private]))
        try:
            await _WorkerServer(config, ready).serve(sockets=sockets)
        finally:
            inner.should_exit = True
            await side
            await siblings.aclose()

    # uvicorn re-raises the signal it drained on once it is done; by then the drain is over, so
    # the worker ends with 0 rather than dying of that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    loop_factory = config.get_loop_factory()
    if loop_factory is None:
        asyncio.run(serve())
    else:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve())


def _private_socket(path: Path) -> socket.socket:
    """The worker's Unix socket, replacing one left by a worker that died."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    return sock


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this worker once the supervisor is gone (killed with SIGKILL, say), so no worker
    keeps serving on its own."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)  # again each second until it ends
            time.sleep(1.0)

    threading.Thread(target=watch, name="kdgate-parent-watch", daemon=True).start()
