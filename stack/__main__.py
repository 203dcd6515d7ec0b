"""`make stack` (= `python -m stack`): the compose stack on this machine, until Ctrl-C.

Starts the webhook receiver, the teacher, the gateway, Alertmanager and Prometheus on
127.0.0.1 (stack/run.py), then `kdgate loadgen` sending digits traffic with feedback labels,
prints the URLs, then one line per page or ticket notification and per retrain webhook as the
receiver gets it (with the signature verdict), and on SIGINT/SIGTERM stops everything in reverse
order. Secrets come from KDGATE_ADMIN_TOKEN / KDGATE_WEBHOOK_SECRET (as in docker-compose.yml)
or are generated for the run and printed once, since they are throwaway.
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
from pathlib import Path

from stack.configs import ROOT
from stack.process import stop
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
    with running_stack(args.workdir, keys, ports=ports, report=show) as stack:
        loadgen = subprocess.Popen(
            [sys.executable, "-m", "kdgate.service.cli", "loadgen", "--url", stack.gateway.url,
             "--rate", str(args.rate), "--duration", "1e9", "--feedback", "0.5",
             "--drift", args.drift],
            cwd=ROOT,
        )  # fmt: skip
        print(
            f"kdgate stack (state in {args.workdir}), Ctrl-C stops it:\n"
            f"  gateway       {stack.gateway.url}   (student; shadows to the teacher)\n"
            f"  teacher       {stack.teacher.url}\n"
            f"  prometheus    {stack.prometheus.url}\n"
            f"  alertmanager  {stack.alertmanager.url}\n"
            f"  receiver      {stack.receiver.url}   (retrain webhooks; /alerts/page, /ticket;\n"
            f"                GET http://127.0.0.1:{stack.receiver.port}/ lists what it got)\n"
            f"  loadgen       {args.rate:g} req/s, drift={args.drift}, feedback on half\n"
            "  secrets       KDGATE_ADMIN_TOKEN, KDGATE_WEBHOOK_SECRET (else made for this run)\n"
            f"Grafana: import dashboards/json/*.json with {stack.prometheus.url} as datasource.\n"
            "Notifications and retrain requests as the receiver gets them:",
            flush=True,
        )
        try:
            while not stopping.wait(1.0):
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
