"""The `kdgate` command: `serve`, and `distill` (which lives in distill/, loaded lazily).

`rules` and `loadgen` join as further subcommands; each subcommand is one function.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdgate.service.settings import Settings, load_settings

GIL_SWITCH_INTERVAL_SECONDS = 0.0002  # CPython's default is 0.005


def serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the configured app until SIGINT/SIGTERM (in-flight requests finish)."""
    import uvicorn

    from kdgate.service.app import create_app

    settings = load_settings(args.config)
    for key, path in missing_cards(settings):
        # A wheel installed without its package data, or a config naming a moved file: say what
        # to set instead of failing inside the app's startup with a traceback.
        print(
            f"kdgate serve: no model card at {path}; set `{key}` to a card file in a config "
            "passed with --config FILE (or $KDGATE_CONFIG)",
            file=sys.stderr,
        )
        return 2
    server = settings.server
    # The teachers' worker threads (monitoring/teacher.py) run Python too (encoding, httpx):
    # when one holds the GIL, the event loop gets it back within this time instead of CPython's
    # default 5 ms, which the student's latency tail would otherwise show. Only contended
    # hand-offs are affected: with no teacher thread busy, nothing changes.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    config = uvicorn.Config(
        create_app(settings),
        host=args.host or server.host,
        port=server.port if args.port is None else args.port,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # applied by the app itself, outside the inference fast path
        log_level=server.log_level,
        log_config=log_config(server.log_level),
        timeout_graceful_shutdown=server.graceful_shutdown_seconds,
    )
    uvicorn.Server(config).run()
    return 0


def missing_cards(settings: Settings) -> list[tuple[str, Path]]:
    """(config key, path) of every local model card the settings name that does not exist."""
    missing = []
    for i, model in enumerate(settings.models):
        for j, student in enumerate(model.students):
            if not student.card.is_file():
                missing.append((f"models[{i}].students[{j}].card", student.card))
        teacher = model.teacher.card if model.teacher is not None else None
        if teacher is not None and not teacher.is_file():
            missing.append((f"models[{i}].teacher.card", teacher))
    return missing


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus kdgate's loggers on its stderr handler.

    Without this only uvicorn's own loggers have a handler, and kdgate's INFO lines (the admin
    audit trail above all) would be dropped. `kdgate.audit` logs at INFO whatever `level` is.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    ours = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"].update({"kdgate": ours, "kdgate.audit": {"level": "INFO"}})
    return config


def rules(argv: list[str]) -> int:
    """`kdgate rules [--config FILE] [--out DIR | --stdout]`: Prometheus rules from `slo:`."""
    from kdgate.monitoring.rules import main_rules
    from kdgate.service.slo_runtime import model_objectives

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path)
    known, _ = config.parse_known_args(argv)
    settings = load_settings(known.config)
    # The objectives the in-process monitor uses: config + each model's student cards.
    return main_rules(argv, settings.slo, model_objectives(settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="serve the configured models over HTTP")
    run.add_argument("--config", type=Path, help="YAML config file (default: $KDGATE_CONFIG)")
    run.add_argument("--host", help="bind address (default: server.host)")
    run.add_argument("--port", type=int, help="port; 0 picks a free one (default: server.port)")
    run.set_defaults(handler=serve)

    commands.add_parser(
        "distill", help="train a student from the teacher (distill/)", add_help=False
    )
    commands.add_parser("rules", help="render Prometheus SLO rules from `slo:`", add_help=False)
    commands.add_parser("loadgen", help="send digits traffic, optionally drifted", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdgate` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["distill"]:
        # distill/ pulls in torch: import it only when asked, and let it parse its own options.
        distill_cli = importlib.import_module("kdgate.distill.cli")
        return int(distill_cli.main(args_list[1:]) or 0)
    if args_list[:1] == ["rules"]:
        return rules(args_list[1:])
    if args_list[:1] == ["loadgen"]:
        from kdgate.service import loadgen

        return loadgen.main(args_list[1:])
    args = build_parser().parse_args(args_list)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
