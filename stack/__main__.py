"""`make stack` (= `python -m stack`): the compose stack on this machine, until Ctrl-C.

Starts the webhook receiver, the teacher, the gateway, Alertmanager and Prometheus on
127.0.0.1 (stack/run.py), then `kdgate loadgen` sending digits traffic with feedback labels,
prints the URLs, then one line per page or ticket notification and per retrain webhook as the
receiver gets it (with the signature verdict), and on SIGINT/SIGTERM stops everything in reverse
order. Secrets come from KDGATE_ADMIN_TOKEN / KDGATE_WEBHOOK_SECRET (as in docker-compose.yml)
or are generated for the run and printed once, since they are throwaway.

`--loop` closes the loop (stack/loop.py): the gateway captures every shadowed row and posts its
retrain requests to `kdgate retrain-worker`, which distils a new student from the capture,
registers it and starts its rollout; one line per job and rollout change is printed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from stack.configs import ROOT
from stack.loop import LoopWatch, loop_overrides, running_worker
from stack.process import stop
from stack.receiver import reserve_port
from stack.run import Ports, Secrets, running_stack


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "stack")
    parser.add_argument("--rate", type=float, default=20.0, help="loadgen requests per second")
    parser.add_argument(
        "--drift", default="none", choices=["none", "noise", "invert", "shift"], help="loadgen"
    )
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--teacher-port", type=int, default=8001)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument("--receiver-port", type=int, default=8080)
    parser.add_argument(
        "--loop", action="store_true", help="retrain worker, capture and rollouts: the loop"
    )
    parser.add_argument("--worker-port", type=int, default=8090, help="with --loop; 0: any")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    keys = Secrets(
        os.environ.get("KDGATE_ADMIN_TOKEN") or secrets.token_hex(32),
        os.environ.get("KDGATE_WEBHOOK_SECRET") or "whsec_" + secrets.token_hex(32),
    )
    ports = Ports(
        args.gateway_port,
        args.teacher_port,
        args.prometheus_port,
        args.alertmanager_port,
        args.receiver_port,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    gateway_overrides: dict[str, object] = {}
    model_overrides: dict[str, object] = {}
    worker_port = args.worker_port
    if args.loop:
        if worker_port == 0:  # the gateway needs the worker's address before the worker runs
            holder = reserve_port()
            worker_port = holder.getsockname()[1]
            holder.close()
        gateway_overrides, model_overrides = loop_overrides(args.workdir, worker_port)
    with ExitStack() as running:
        stack = running.enter_context(
            running_stack(
                args.workdir,
                keys,
                ports=ports,
                report=show,
                gateway_overrides=gateway_overrides,
                model_overrides=model_overrides,
            )
        )
        watch = None
        if args.loop:
            worker = running.enter_context(
                running_worker(args.workdir, keys, stack.gateway.url, worker_port)
            )
            watch = LoopWatch(stack.gateway.url, worker.url, keys.admin_token, report=show)
        loadgen = subprocess.Popen(
            [sys.executable, "-m", "kdgate.service.cli", "loadgen", "--url", stack.gateway.url,
             "--rate", str(args.rate), "--duration", "1e9", "--feedback", "0.5",
             "--drift", args.drift],
            cwd=ROOT,
        )  # fmt: skip
        lines = [
            f"kdgate stack (state in {args.workdir}), Ctrl-C stops it:",
            f"  gateway       {stack.gateway.url}   (student; shadows to the teacher)",
            f"  teacher       {stack.teacher.url}",
            f"  prometheus    {stack.prometheus.url}",
            f"  alertmanager  {stack.alertmanager.url}",
            f"  receiver      {stack.receiver.url}   (retrain webhooks; /alerts/page, /ticket;",
            f"                GET http://127.0.0.1:{stack.receiver.port}/ lists what it got)",
            f"  loadgen       {args.rate:g} req/s, drift={args.drift}, feedback on half",
            "  secrets       KDGATE_ADMIN_TOKEN, KDGATE_WEBHOOK_SECRET (else made for this run)",
            f"Grafana: import dashboards/json/*.json with {stack.prometheus.url} as datasource.",
            "Notifications and retrain requests as the receiver gets them:",
        ]
        if watch is not None:
            lines[5:7] = [
                f"  receiver      http://127.0.0.1:{stack.receiver.port}   (/alerts/page, /ticket)",
                f"  worker        {worker.url}   (`kdgate retrain-worker`: retrain requests, "
                "GET /jobs)",
            ]
            lines[-1] = "Pages and tickets as the receiver gets them, retrain jobs and rollouts:"
        print("\n".join(lines), flush=True)
        try:
            while not stopping.wait(1.0):
                if watch is not None:
                    watch.poll()
                if loadgen.poll() is not None:
                    print(f"loadgen exited with {loadgen.returncode}", file=sys.stderr)
                    return 1
        finally:
            stop(loadgen, grace_seconds=5)
    print("kdgate stack stopped", flush=True)
    return 0


def show(line: str) -> None:
    """Print a receiver line at once (called from the receiver's threads)."""
    print(f"  {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
