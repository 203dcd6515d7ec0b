"""`python -m bench.soak`: a long run at a steady rate, watching for leaks and failures.

    python -m bench.soak --minutes 30 --rate 200 --feedback 0.5

Serves the embedded digits pair with every request shadowed to the local teacher
(`shadow_fraction: 1.0`), sends `--rate` requests/s with k6 (constant arrival rate, so the
offered load holds whatever the server does; a Python client on this 2-core machine fell to
~75 req/s): digits rows from the reference sample as V2 JSON, each with its own id, and a
`--feedback` share of them labelled through the feedback API. Every `--every` seconds it reads
the resident memory and open file descriptors of the gateway and of its children (the drift
process) from /proc. Prints one line per reading and a verdict:

- failed requests: every non-2xx answer, transport error or request k6 could not start in
  time (dropped), inference and feedback alike (target 0);
- RSS flat: the last reading within `--rss-tolerance` (5 %) of the reading at the end of the
  warm-up (`--warmup-minutes`, by when the feedback store and the windows are full);
- descriptors flat: the highest reading of the second half of the run after the warm-up no
  higher than the highest of the first half, plus `FD_SLACK` (client connections come and go).

Exit status 0 when all three hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from bench import k6
from bench.procstat import PROC, descendants, memory_kib, parse_status_kib
from bench.servers import free_port, kdgate_command, running
from kdgate.service.settings import default_models_dir

FD_SLACK = 4


SCRIPT = """\
import http from 'k6/http';

const sample = JSON.parse(open(__ENV.SOAK_SAMPLE));
const base = __ENV.SOAK_URL;
const feedback = Number(__ENV.SOAK_FEEDBACK);
const params = { headers: { 'Content-Type': 'application/json' }, timeout: '10s' };

export const options = {
  discardResponseBodies: true,
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.SOAK_RATE),
      timeUnit: '1s',
      duration: __ENV.SOAK_DURATION,
      preAllocatedVUs: 32,
      maxVUs: 256,
    },
  },
};

export default function () {
  const i = Math.floor(Math.random() * sample.labels.length);
  const id = `soak-${__VU}-${__ITER}`;
  const body = { id: id, inputs: [{ name: 'input', shape: [1, 64], datatype: 'FP32',
                                    data: sample.inputs[i] }] };
  http.post(`${base}/v2/models/digits/infer`, JSON.stringify(body), params);
  if (Math.random() < feedback) {
    http.post(`${base}/v2/models/digits/feedback`,
              JSON.stringify([{ id: id, label: sample.labels[i] }]), params);
  }
}

export function handleSummary(data) {
  return { [__ENV.SOAK_SUMMARY]: JSON.stringify(data) };
}
"""


def memory_split_kib(pid: int) -> tuple[int, int]:
    """(VmRSS of `pid` itself, VmRSS of its descendants summed), KiB."""
    total, _ = memory_kib(pid)
    try:
        own = parse_status_kib((PROC / str(pid) / "status").read_text(), "VmRSS")
    except OSError:
        own = 0
    return own, total - own


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
    # Both bounded pools of the feedback store (50,000 predictions, then as many tombstones)
    # are full after ~8.5 min at 200 requests/s: the memory plateau starts there.
    parser.add_argument("--warmup-minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="requests per second")
    parser.add_argument("--feedback", type=float, default=0.5, help="share labelled")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between readings")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    binary = k6.find()
    if binary is None:
        print("k6 not found (the dev extra ships it)")
        return 2

    with tempfile.TemporaryDirectory(prefix="kdgate-soak-") as tmp:
        directory = Path(tmp)
        with np.load(default_models_dir() / "digits" / "reference.npz") as data:
            sample = {
                "inputs": np.asarray(data["inputs"], dtype=np.float32).tolist(),
                "labels": np.asarray(data["labels"]).astype(int).tolist(),
            }
        (directory / "sample.json").write_text(json.dumps(sample))
        (directory / "soak.js").write_text(SCRIPT)
        port = free_port()
        command = [*kdgate_command(), "serve", "--config", str(config(directory))]
        with running(command, port=port, core=None, log=directory / "server.log") as server:
            readings: list[tuple[float, int, int, int]] = []  # (s, gateway KiB, children KiB, fds)
            done = threading.Event()
            started = time.monotonic()

            def watch() -> None:
                while True:
                    own, children = memory_split_kib(server.pid)
                    fds = open_fds(server.pid)
                    elapsed = time.monotonic() - started
                    readings.append((elapsed, own, children, fds))
                    print(
                        f"{elapsed / 60:6.1f} min  RSS {(own + children) / 1024:7.1f} MiB "
                        f"(gateway {own / 1024:6.1f}, children {children / 1024:6.1f})  fds {fds}"
                    )
                    sys.stdout.flush()
                    if done.wait(args.every):
                        return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            seconds = round(args.minutes * 60)
            env = {
                **os.environ,
                "SOAK_URL": f"http://127.0.0.1:{port}",
                "SOAK_SAMPLE": str(directory / "sample.json"),
                "SOAK_FEEDBACK": str(args.feedback),
                "SOAK_RATE": str(args.rate),
                "SOAK_DURATION": f"{seconds}s",
                "SOAK_SUMMARY": str(directory / "summary.json"),
                "K6_NO_USAGE_REPORT": "true",
            }
            subprocess.run(
                [binary, "run", "--quiet", "--no-color", str(directory / "soak.js")],
                env=env,
                timeout=seconds + 120,
                check=False,
            )
            done.set()
            watcher.join()
            summary = json.loads((directory / "summary.json").read_text())["metrics"]

    requests = int(summary["http_reqs"]["values"]["count"])
    failed = int(summary.get("http_req_failed", {}).get("values", {}).get("passes", 0))
    dropped = int(summary.get("dropped_iterations", {}).get("values", {}).get("count", 0))
    warm = [r for r in readings if r[0] >= args.warmup_minutes * 60]
    if len(warm) < 2:
        print("too short to judge: no reading after the warm-up")
        return 1
    base, last = warm[0], warm[-1]
    rss_ok = last[1] + last[2] <= (base[1] + base[2]) * (1 + args.rss_tolerance)
    half = len(warm) // 2
    fds_ok = max(r[3] for r in warm[half:]) <= max(r[3] for r in warm[:half]) + FD_SLACK
    print(
        f"{requests} HTTP requests ({requests / seconds:.0f}/s incl. feedback), "
        f"{failed} failed, {dropped} dropped"
    )
    print(
        f"after warm-up: RSS {(base[1] + base[2]) / 1024:.1f} -> {(last[1] + last[2]) / 1024:.1f} "
        f"MiB ({(last[1] + last[2]) / (base[1] + base[2]) - 1:+.1%}); gateway "
        f"{base[1] / 1024:.1f} -> {last[1] / 1024:.1f} MiB ({last[1] / base[1] - 1:+.1%}); "
        f"fds {base[3]} -> {last[3]}"
    )
    verdict = failed == 0 and dropped == 0 and rss_ok and fds_ok
    print("PASS" if verdict else "FAIL")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
