"""Per-request CPU of a server's ASGI app, in process: no sockets, HTTP parser or load generator.

    python -m bench.inproc --app kdgate|ceiling [--workload digits|text-b1|text-b32]
        [--requests N] [--concurrency C] [--rounds R]

The app (kdgate as `make bench` configures it, or `bench/ceiling.py`) is built for the workload
(`bench/workloads.py`: its model and request body), its lifespan started, and driven on uvloop
with that payload through fake `receive`/`send`: each
request a task of its own, as uvicorn runs it, `--concurrency` of them started together (1: the
c1 shape; 16: requests of one loop turn share a micro-batch, as at c16). Every answer must be a
200. It prints the process CPU time (`time.process_time`) per request over `--requests`
requests, for each of `--rounds` rounds after a warm-up, and their median.

On a shared machine this is steadier than wall-clock throughput, since the time other processes
run is not counted; instruction counts do not depend on load at all:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --separate-threads=yes \
        --dump-before=time_process_time python -m bench.inproc \
        --app kdgate --requests 2000 --rounds 1 --warmup 300 --rows-only

The event loop thread's second dump (`callgrind.out.<pid>.2-01`) is the measured round exactly:
its total over 2000 is instructions per request (`callgrind_annotate` shows where they go).
Worker threads (the traffic-file poll's `to_thread`) dump separately and are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.workloads import Workload, WorkloadName
from bench.workloads import build as build_workload

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
WORKLOADS: tuple[WorkloadName, ...] = ("digits", "text-b1", "text-b32")


# Under valgrind a round lasts ~100x longer, so jobs that run every few seconds of wall time
# (traffic-file poll, SLO evaluation, drift) would land in the count, more of them the busier
# the machine: one tree counted 248k and 236k per request. Stretched, counts repeat within 0.4 %.
QUIET_TIMERS = {
    "traffic": {"poll_seconds": 5},  # the longest allowed
    "slo": {"evaluate_every_seconds": 3600},
    "drift": {"every_seconds": 3600},
}


def build(kind: str, work: Workload, workdir: Path, *, quiet_timers: bool = False) -> App:
    """The ASGI app for `kind` serving `work`'s student, configured as `make bench` runs it
    (shadow off, default rest); `quiet_timers`: with the periodic jobs of `QUIET_TIMERS`
    stretched (for callgrind)."""
    if kind == "ceiling":
        from bench.ceiling import build_app

        return build_app(work.student.onnx, work.model)
    import yaml

    from bench.scenarios import kdgate_config, select
    from kdgate.service.app import create_app
    from kdgate.service.settings import load_settings

    # The one-worker kdgate scenario of `make bench` for this workload ("kdgate", "kdgate-text-b1").
    name = "kdgate" if work.name == "digits" else f"kdgate-{work.name}"
    (scenario,) = select([name])
    config = kdgate_config(
        scenario,
        port=0,
        student_card=str(work.student.card),
        placeholders={},
        model_name=work.model,
    )
    config["admin"] = {"state_dir": str(workdir / "state")}
    if quiet_timers:
        for section, values in QUIET_TIMERS.items():
            config.setdefault(section, {}).update(values)
    path = workdir / "kdgate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return create_app(load_settings(path))


class Lifespan:
    """The ASGI lifespan protocol, as a server speaks it: startup, then shutdown."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        await self.app(scope, self._inbox.get, self._outbox.put)

    async def _step(self, event: str) -> None:
        await self._inbox.put({"type": f"lifespan.{event}"})
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        get = asyncio.ensure_future(self._outbox.get())
        done, _ = await asyncio.wait({get, self._task}, timeout=600, return_when="FIRST_COMPLETED")
        if get not in done:
            get.cancel()
            if self._task.done():  # an app without a lifespan (the ceiling) just returns
                return
            raise RuntimeError(f"lifespan {event} did not answer within 600 s")
        answer = get.result()
        if answer["type"] != f"lifespan.{event}.complete":
            raise RuntimeError(f"lifespan {event}: {answer}")

    async def __aenter__(self) -> Lifespan:
        await self._step("startup")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._step("shutdown")


class Driver:
    """Sends the payload to an app as uvicorn would, and checks each answer is a 200."""

    def __init__(self, app: App, path: str, body: bytes) -> None:
        self.app = app
        self.path = path
        self.message = {"type": "http.request", "body": body, "more_body": False}
        self.headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench.inproc"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        self.failures = 0

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": "POST",
            "root_path": "",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "headers": list(self.headers),
            "state": {},
        }

    async def one(self) -> None:
        message = self.message

        async def receive() -> dict[str, Any]:
            return message

        async def send(sent: dict[str, Any]) -> None:
            if sent["type"] == "http.response.start" and sent["status"] != 200:
                self.failures += 1

        await self.app(self.scope(), receive, send)

    async def run(self, requests: int, concurrency: int) -> None:
        loop = asyncio.get_running_loop()
        left = requests
        while left > 0:
            wave = [loop.create_task(self.one()) for _ in range(min(concurrency, left))]
            for task in wave:
                await task
            left -= len(wave)
        await asyncio.sleep(0.02)  # the request log's settle timer (10 ms) runs in the round


async def measure(args: argparse.Namespace, workdir: Path) -> list[float]:
    """CPU seconds per request, one figure per round."""
    work = build_workload(args.workload, workdir)
    app = build(args.app, work, workdir, quiet_timers=args.rows_only)
    if args.rows_only and args.app == "kdgate":
        # Under valgrind a request takes ~100x longer, so the request log's 10 ms timer would
        # settle nearly every request, and its cost per request would depend on the machine's
        # load: settle by rows only (64 per settle, as at full speed). The periodic jobs are
        # stretched for the same reason (`QUIET_TIMERS`).
        app.state.request_log._seconds = 3600.0
    driver = Driver(app, work.infer_path, work.body)
    figures = []
    async with Lifespan(app):
        await driver.run(args.warmup, args.concurrency)
        for _ in range(args.rounds):
            gc.collect()
            started = time.process_time()
            await driver.run(args.requests, args.concurrency)
            figures.append((time.process_time() - started) / max(args.requests, 1))
    if driver.failures:
        raise SystemExit(f"{driver.failures} requests were not answered 200")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument("--app", choices=("kdgate", "ceiling"), default="kdgate")
    parser.add_argument(
        "--workload", choices=WORKLOADS, default="digits", help="model and request body"
    )
    parser.add_argument("--requests", type=int, default=20_000, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2_000, help="requests before the rounds")
    parser.add_argument("--concurrency", type=int, default=1, help="requests started together")
    parser.add_argument(
        "--rows-only",
        action="store_true",
        help="settle the request log by rows only and stretch the periodic jobs (callgrind)",
    )
    args = parser.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="kdgate-inproc-") as tmp:
        figures = uvloop.run(measure(args, Path(tmp)))
    rounds = " ".join(f"{f * 1e6:.1f}" for f in figures)
    median = statistics.median(figures) * 1e6
    sys.stdout.write(
        f"{args.app} {args.workload} c{args.concurrency}: {median:.1f} us CPU/request "
        f"(rounds: {rounds})\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
