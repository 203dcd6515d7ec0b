"""A/B of two kdgate trees in paired phases: which one costs less CPU per request at c16?

    python -m bench.ab --base /path/to/other/tree [--rounds 12] [--seconds 3] [--warmup 6]

`make bench` measures each scenario in its own window of about half a minute; on a shared host
the speed of the machine drifts between windows by more than a change to the hot path moves
(the ceiling's CPU per request went from 85 to 70 µs within one minute here). This keeps three
servers up at once on the server core, kdgate from `--base` (e.g. a `git worktree` of the
commit before), kdgate from this tree and the ceiling, and runs short wrk c16 phases against
each in turn, in alternating order, for `--rounds` rounds. Figures of one round are seconds
apart, so their ratios are paired; it prints each round's and their medians. The drift job is
stretched to an hour in both configs (its child process would otherwise land in some phases).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from bench import procstat, servers, workloads, wrk
from bench.scenarios import kdgate_config, select

THIS_TREE = Path(__file__).resolve().parent.parent


def paired(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round-by-round ratios of two series measured in the same rounds."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def order(names: Sequence[str], round_index: int) -> list[str]:
    """The servers' order in a round: as given in even rounds, reversed in odd ones."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the other kdgate tree")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0, help="per c16 phase")
    parser.add_argument(
        "--warmup", type=float, default=6.0, help="c16 s per server first (fills the stores)"
    )
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    args = parser.parse_args(argv)
    trees = {"base": args.base.resolve(), "this": THIS_TREE}
    with tempfile.TemporaryDirectory(prefix="kdgate-ab-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        work = workloads.build("digits", workdir)
        (scenario,) = select(["kdgate"])
        urls: dict[str, tuple[int, str]] = {}
        for name, tree in trees.items():
            port = servers.free_port()
            config = kdgate_config(
                scenario,
                port=port,
                student_card=str(work.student.card),
                placeholders={},
                model_name=work.model,
            )
            config["drift"] = {"every_seconds": 3600}
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            # The module, not the console script: PYTHONPATH picks the tree it is imported from.
            command = [sys.executable, "-m", "kdgate.service.cli", "serve", "--config", str(path)]
            proc = stack.enter_context(
                servers.running(
                    command,
                    port=port,
                    core=args.server_core,
                    log=workdir / f"{name}.log",
                    cwd=tree,
                    env={**os.environ, "PYTHONPATH": str(tree)},
                )
            )
            urls[name] = (proc.pid, f"http://127.0.0.1:{port}{work.infer_path}")
        port = servers.free_port()
        ceiling = servers.bench_server_command("ceiling", work.student.onnx, work.model)
        proc = stack.enter_context(
            servers.running(ceiling, port=port, core=args.server_core, log=workdir / "ceiling.log")
        )
        urls["ceiling"] = (proc.pid, f"http://127.0.0.1:{port}{work.infer_path}")
        script = workdir / "post.lua"
        script.write_text(wrk.lua_script(work.body))
        client = servers.pin(args.client_core)
        rps: dict[str, list[float]] = {name: [] for name in urls}
        cpu: dict[str, list[float]] = {name: [] for name in urls}
        for _, url in urls.values():  # warm-up, long enough to fill kdgate's feedback store
            wrk.run(url, script, connections=16, duration_s=args.warmup, pin=client)
        for index in range(args.rounds):
            for name in order(list(urls), index):
                pid, url = urls[name]
                before = procstat.sample(pid, ())
                load = wrk.run(url, script, connections=16, duration_s=args.seconds, pin=client)
                after = procstat.sample(pid, ())
                rps[name].append(load.requests / load.duration_s)
                cpu[name].append(1e6 * (after.process_cpu_s - before.process_cpu_s) / load.requests)
    for name in urls:
        print(f"{name:8s} req/s {[round(v) for v in rps[name]]}")
        print(f"{'':8s} CPU µs/req {[round(v, 1) for v in cpu[name]]}")
    for label, (top, bottom) in {
        "this/base CPU per request": (cpu["this"], cpu["base"]),
        "base/ceiling throughput": (rps["base"], rps["ceiling"]),
        "this/ceiling throughput": (rps["this"], rps["ceiling"]),
    }.items():
        ratios = paired(top, bottom)
        print(
            f"{label}: median {statistics.median(ratios):.3f} "
            f"(rounds: {' '.join(f'{r:.2f}' for r in ratios)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
