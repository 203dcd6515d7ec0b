"""`python -m bench.rss`: how a default `kdgate serve` grows in resident memory under traffic.

Starts `python -m kdgate serve --port 0` with no config (the shipped digits pair, default
settings), sends `--first` V2 digits requests, reads VmRSS from /proc/<pid>/status, sends more
until `--total` requests were served, and reads VmRSS again. The ratio of the two is what the
monitoring state costs once full: at default settings the feedback store holds 50,000
predictions, so by 200,000 requests every bounded structure has reached its bound.

Load comes from wrk (one thread, `--connections` connections) with a Lua counter that ends it
after the requested number of responses; the server settles for `--settle-seconds` (background
bookkeeping finishes) before each reading. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import wrk
from bench.model import payload_row, v2_body
from stack.process import KDGATE, listening, without_kdgate_env

REPO = Path(__file__).resolve().parents[1]

# wrk runs for a duration, not a count: the `response` hook exits wrk once `limit` responses
# came back (one thread, so nothing else is cut short), printing how many of them were not 200.
_LUA = """\
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
local served, failed = 0, 0
response = function(status, headers, body)
  served = served + 1
  if status ~= 200 then failed = failed + 1 end
  if served >= %(limit)d then
    io.write(string.format("RSS_LOAD %%d %%d\\n", served, failed))
    io.flush()
    os.exit(0)
  end
end
"""


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def send(url: str, requests: int, *, connections: int, workdir: Path) -> tuple[int, int]:
    """Send `requests` digits infers with wrk; (responses, non-2xx) as wrk counted them.

    Gives up (TimeoutExpired) when wrk has not seen them all at 200 requests/s plus a minute:
    a server that died or hangs is reported, not waited for.
    """
    script = workdir / f"rss-{requests}.lua"
    body = v2_body(payload_row()).decode()
    script.write_text(_LUA % {"body": body, "limit": max(1, requests)})
    binary = wrk.find()
    if binary is None:
        raise FileNotFoundError("wrk (apt-get install wrk)")
    done = subprocess.run(
        [binary, "-t1", f"-c{connections}", "-d3600s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=60 + requests / 200,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RSS_LOAD "):
            served, failed = line.split()[1:]
            return int(served), int(failed)
    raise RuntimeError(f"wrk stopped early:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__)
    parser.add_argument("--first", type=int, default=2_000)
    parser.add_argument("--total", type=int, default=200_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "kdgate", "serve", "--port", "0"]
    with (
        tempfile.TemporaryDirectory() as tmp,
        listening(command, KDGATE, env=without_kdgate_env(), cwd=REPO) as server,
    ):
        url = f"{server.url}/v2/models/digits/infer"
        pid = server.process.pid
        readings = {}
        served = failed = 0
        for target in (args.first, args.total):
            try:
                n, bad = send(url, target - served, connections=args.connections, workdir=Path(tmp))
            except (subprocess.TimeoutExpired, RuntimeError) as exc:
                alive = "running" if server.process.poll() is None else "exited"
                log = server.output()[-4000:]
                raise RuntimeError(f"{exc}\nserver {alive}; its log:\n{log}") from exc
            served, failed = served + n, failed + bad
            time.sleep(args.settle_seconds)
            readings[served] = vm_rss_kib(pid)
    (first_n, first), (total_n, total) = readings.items()
    print(
        json.dumps(
            {
                "requests": [first_n, total_n],
                "failed": failed,
                "rss_mib": [round(first / 1024, 1), round(total / 1024, 1)],
                "ratio": round(total / first, 3),
            }
        )
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
