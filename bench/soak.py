"""`python -m bench.soak`: a long run at a steady rate, watching for leaks and failures.

    python -m bench.soak --minutes 30 --rate 200 --feedback 0.5

Serves the embedded digits pair with every request shadowed to the local teacher
(`shadow_fraction: 1.0`), sends `--rate` requests/s from `kdgate loadgen`'s generator (V2 JSON,
with a `--feedback` share of them labelled through the feedback API), and every `--every`
seconds reads the server's resident memory and open file descriptors (summed over the server
and its children, e.g. the drift process) from /proc. Prints one line per reading and a verdict:

- failed requests: every non-200 answer or transport error (target 0);
- RSS flat: the last reading within `--rss-tolerance` (5 %) of the reading at the end of the
  warm-up (`--warmup-minutes`, by when the feedback store and the windows are full);
- descriptors flat: the highest reading of the second half of the run after the warm-up no
  higher than the highest of the first half, plus `FD_SLACK` (client connections come and go).

Exit status 0 when all three hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.procstat import PROC, descendants, memory_kib
from bench.servers import free_port, kdgate_command, running
from kdgate.service.loadgen import LoadConfig, run_load
from kdgate.service.settings import default_models_dir

FD_SLACK = 4


def open_fds(pid: int) -> int:
    """Open file descriptors of `pid` and its descendants."""
    total = 0
    for member in descendants(pid):
        try:
            total += len(os.listdir(PROC / str(member) / "fd"))
        except OSError:
            continue  # gone meanwhile
    return total


def config(directory: Path) -> Path:
    """A config serving the embedded digits pair with every request shadowed."""
    digits = default_models_dir() / "digits"
    path = directory / "soak.yaml"
    data = {
        "models": [
            {
                "name": "digits",
                "students": [{"version": "1", "card": str(digits / "student-v1.card.json")}],
                "teacher": {"card": str(digits / "teacher.card.json")},
                "traffic": {"shadow_fraction": 1.0},
            }
        ],
        "admin": {"state_dir": str(directory / "state")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--feedback", type=float, default=0.5, help="share labelled")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between readings")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kdgate-soak-") as tmp:
        directory = Path(tmp)
        port = free_port()
        command = [*kdgate_command(), "serve", "--config", str(config(directory))]
        with running(command, port=port, core=None, log=directory / "server.log") as server:
            readings: list[tuple[float, int, int]] = []  # (seconds, RSS KiB, fds)
            done = threading.Event()
            started = time.monotonic()

            def watch() -> None:
                while True:
                    rss, _ = memory_kib(server.pid)
                    fds = open_fds(server.pid)
                    elapsed = time.monotonic() - started
                    readings.append((elapsed, rss, fds))
                    print(f"{elapsed / 60:6.1f} min  RSS {rss / 1024:7.1f} MiB  fds {fds}")
                    sys.stdout.flush()
                    if done.wait(args.every):
                        return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            load = LoadConfig(
                url=f"http://127.0.0.1:{port}",
                rate=args.rate,
                duration_seconds=args.minutes * 60,
                feedback=args.feedback,
            )
            stats = asyncio.run(run_load(load))
            done.set()
            watcher.join()
            rss, _ = memory_kib(server.pid)
            readings.append((time.monotonic() - started, rss, open_fds(server.pid)))

    warm = [r for r in readings if r[0] >= args.warmup_minutes * 60]
    if len(warm) < 2:
        print("too short to judge: no reading after the warm-up")
        return 1
    base, last = warm[0], warm[-1]
    peak = max(r[1] for r in warm)
    rss_ok = last[1] <= base[1] * (1 + args.rss_tolerance)
    half = len(warm) // 2
    fds_ok = max(r[2] for r in warm[half:]) <= max(r[2] for r in warm[:half]) + FD_SLACK
    failed = stats.errors + (stats.sent - stats.ok - stats.errors)
    print(stats.summary())
    print(
        f"after warm-up: RSS {base[1] / 1024:.1f} -> {last[1] / 1024:.1f} MiB "
        f"({last[1] / base[1] - 1:+.1%}, peak {peak / 1024:.1f}); fds {base[2]} -> {last[2]}; "
        f"failed requests {failed}"
    )
    verdict = failed == 0 and rss_ok and fds_ok
    print("PASS" if verdict else "FAIL")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
