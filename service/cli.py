"""The `kdgate` command: one function per subcommand.

    kdgate serve [--config FILE] [--workers N]   serve the configured models
    kdgate config check FILE         print the effective config (secrets masked), or its errors
    kdgate rules | loadgen           Prometheus rules from `slo:`; send test traffic
    kdgate distill                   train a student (the `train` extra; distill/, loaded lazily)

Operator mistakes end in one line on stderr and exit code 2 (argparse's usage-error code): a bad
config names its file, key path and reason (service/configcheck.py), a missing optional part
the extra to install. Tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdgate.service.configcheck import ConfigError, effective_yaml, load_checked, missing_extra
from kdgate.service.listeners import ListenError

USAGE_ERROR = 2  # argparse's exit code for a bad command line; a bad config is one too

DESCRIPTION = (
    "Serve knowledge-distilled ONNX students over KServe V2/V1, shadow the teacher, export "
    "fidelity to Prometheus and ask for a retrain when the fidelity SLOs are breached."
)


def serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the configured app until SIGINT/SIGTERM (in-flight requests finish);
    with several workers (`--workers`, `server.workers`), a supervisor and its workers."""
    import uvicorn

    from kdgate.service.app import create_app
    from kdgate.service.listeners import serve_two_ports
    from kdgate.service.workers import serve_workers, tune_interpreter, uvicorn_config

    settings = load_checked(args.config)
    if args.workers is not None:
        server = settings.server.model_copy(update={"workers": args.workers})
        settings = settings.model_copy(update={"server": server})
    server = settings.server
    host = args.host or server.host
    port = server.port if args.port is None else args.port
    if server.workers > 1:
        return serve_workers(args.config, settings, host, port)
    tune_interpreter()
    app = create_app(settings)
    config = uvicorn_config(settings, app, host, port)
    if server.admin_port is None:
        uvicorn.Server(config).run()
    else:
        serve_two_ports(config, app, server.admin_port)
    return 0


def config_check(args: argparse.Namespace) -> int:
    """Print the effective config of FILE (defaults and KDGATE_* applied, secrets masked)."""
    sys.stdout.write(effective_yaml(load_checked(args.file)))
    return 0


def rules(argv: list[str]) -> int:
    """`kdgate rules [--config FILE] [--out DIR | --stdout]`: Prometheus rules from `slo:`."""
    from kdgate.monitoring.rules import main_rules
    from kdgate.service.monitoring_runtime import model_objectives

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path)
    known, _ = config.parse_known_args(argv)
    settings = load_checked(known.config)
    # The objectives the in-process monitor uses: config + each model's student cards.
    return main_rules(argv, settings.slo, model_objectives(settings))


def build_parser() -> argparse.ArgumentParser:
    from kdgate.service.endpoints import package_version  # FastAPI: only for these commands

    parser = argparse.ArgumentParser(prog="kdgate", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"kdgate {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="serve the configured models over HTTP")
    run.add_argument("--config", type=Path, help="YAML config file (default: $KDGATE_CONFIG)")
    run.add_argument("--host", help="bind address (default: server.host)")
    run.add_argument("--port", type=int, help="port; 0 picks a free one (default: server.port)")
    run.add_argument(
        "--workers",
        type=_positive,
        help="worker processes on this host (default: server.workers, 1)",
    )
    run.set_defaults(handler=serve)

    config = commands.add_parser("config", help="check a config file")
    checks = config.add_subparsers(dest="action", required=True)
    check = checks.add_parser(
        "check", help="print the effective config (secrets masked) or its errors (exit 2)"
    )
    check.add_argument("file", type=Path, help="YAML config file")
    check.set_defaults(handler=config_check)

    commands.add_parser(
        "distill", help="train a student from the teacher (distill/)", add_help=False
    )
    commands.add_parser("rules", help="render Prometheus SLO rules from `slo:`", add_help=False)
    commands.add_parser("loadgen", help="send digits traffic, optionally drifted", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdgate` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args_list)
    except ConfigError as exc:
        return _fail(str(exc))
    except ListenError as exc:
        return _fail(f"kdgate: {exc}", code=1)
    except ImportError as exc:
        line = missing_extra(exc)
        if line is None:
            raise
        return _fail(line)


def _dispatch(args_list: list[str]) -> int:
    # These subcommands parse their own options (distill/ pulls in torch: imported only here).
    delegated: dict[str, Callable[[list[str]], Any]] = {
        "distill": lambda rest: importlib.import_module("kdgate.distill.cli").main(rest),
        "rules": rules,
        "loadgen": lambda rest: importlib.import_module("kdgate.service.loadgen").main(rest),
    }
    if args_list[:1] and args_list[0] in delegated:
        return int(delegated[args_list[0]](args_list[1:]) or 0)
    args = build_parser().parse_args(args_list)
    return int(args.handler(args))


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected a number of workers from 1 to 64, got {text!r}")
    return value


def _fail(line: str, code: int = USAGE_ERROR) -> int:
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
