"""Closed-loop load with wrk: N connections, each sending the next request when the last returns.

wrk's own summary has no p95, so a Lua `done` hook prints one machine-readable line
(`BENCH_RESULT {json}`) with the request count, errors and the p50/p95/p99/max latency.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.results import LoadResult

MARKER = "BENCH_RESULT "

_LUA = """\
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests":%%.0f,"duration_us":%%.0f,"connect":%%.0f,"read":%%.0f,' ..
    '"write":%%.0f,"status":%%.0f,"timeout":%%.0f,"p50_us":%%.1f,"p95_us":%%.1f,' ..
    '"p99_us":%%.1f,"max_us":%%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def lua_script(body: bytes) -> str:
    """The wrk script that POSTs `body` as JSON and reports percentiles on one line."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("body contains the Lua long-bracket terminator ]==]")
    return _LUA % {"body": text, "marker": MARKER}


def parse_output(stdout: str) -> LoadResult:
    """The LoadResult in wrk's stdout (from the `done` hook's line)."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER) :])
            break
    else:
        raise ValueError(f"no {MARKER.strip()} line in wrk output:\n{stdout[-2000:]}")
    failed = sum(int(raw[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        tool="wrk",
        requests=int(raw["requests"]),
        duration_s=raw["duration_us"] / 1e6,
        failed=failed,
        p50_ms=raw["p50_us"] / 1000,
        p95_ms=raw["p95_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


def find() -> str | None:
    """Path of the wrk binary, or None."""
    return shutil.which("wrk")


def run(
    url: str,
    script: Path,
    *,
    connections: int,
    duration_s: float,
    pin: list[str],
    timeout_s: float = 5.0,
) -> LoadResult:
    """Run wrk with one thread (it has one core) against `url` and parse its result."""
    wrk = find()
    if wrk is None:
        raise FileNotFoundError("wrk")
    command = [
        *pin,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_output(done.stdout)
