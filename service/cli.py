"""The `kdgate` command: one function per subcommand.

    kdgate serve [--config FILE] [--workers N]   serve the configured models
    kdgate config check FILE         print the effective config (secrets masked), or its errors
    kdgate import --teacher T.onnx --student S.onnx --name NAME --out DIR
                                     cards, figures, drift reference and config for a pair
    kdgate rules | loadgen           Prometheus rules from `slo:`; send test traffic
    kdgate distill                   train a student (the `train` extra; distill/, loaded lazily)
    kdgate retrain-worker [--config FILE]  answer the retrain webhook: retrain, register, roll out

Operator mistakes end in one line on stderr and exit code 2 (argparse's usage-error code): a bad
config names its file, key path and reason (service/configcheck.py), a missing optional part
the extra to install. A pair `kdgate import` cannot compare ends in one line saying why, exit 1
(the command line was fine; the models are not). Tracebacks are for bugs.
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
REFUSED = 1  # `kdgate import`: the pair cannot be served as one

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


def import_pair(args: argparse.Namespace) -> int:
    """Write cards, figures, the drift reference and a config for a pair; print the config."""
    from kdgate.service.importer import ImportRequest, IncomparablePair
    from kdgate.service.importer import import_pair as run_import

    request = ImportRequest(
        teacher=args.teacher,
        student=args.student,
        name=args.name,
        out=args.out,
        sample=args.sample,
        input_map=dict(args.input_map),
        scores_output=args.scores_output,
        output_kind=args.output_kind,
        class_labels=args.class_labels.split(",") if args.class_labels else None,
    )
    try:
        imported = run_import(request)
    except IncomparablePair as exc:
        return _fail(f"kdgate import: {exc}", code=REFUSED)
    figures = imported.student_card.metrics.model_dump(exclude={"extra"})
    print(f"# kdgate serve --config {imported.config_path}", file=sys.stderr)
    print(f"# student {imported.student_card.output_kind}, figures {figures}", file=sys.stderr)
    sys.stdout.write(imported.config_yaml)
    return 0


def _name_pair(text: str) -> tuple[str, str]:
    student, sep, teacher = text.partition("=")
    if not sep or not student or not teacher:
        raise argparse.ArgumentTypeError(f"expected STUDENT=TEACHER, got {text!r}")
    return student, teacher


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

    pair = commands.add_parser(
        "import",
        help="cards, figures, drift reference and config for a teacher/student pair of ONNX files",
    )
    pair.add_argument("--teacher", type=Path, required=True, help="teacher ONNX file")
    pair.add_argument("--student", type=Path, required=True, help="student ONNX file")
    pair.add_argument("--name", required=True, help="model name served (/v2/models/NAME)")
    pair.add_argument("--out", type=Path, required=True, help="directory written")
    pair.add_argument(
        "--sample", type=Path, help=".npz (an array per input, optional labels), .parquet, .csv"
    )
    pair.add_argument(
        "--input-map",
        type=_name_pair,
        nargs="+",
        action="extend",
        default=[],
        metavar="STUDENT=TEACHER",
        help="teacher input names that differ from the student's",
    )
    pair.add_argument("--scores-output", help="output holding the scores (default: the rule)")
    pair.add_argument(
        "--output-kind",
        choices=["logits", "probabilities", "regression"],
        help="what the scores are (default: detected)",
    )
    pair.add_argument("--class-labels", help="comma-separated (default: 0..C-1)")
    pair.set_defaults(handler=import_pair)

    commands.add_parser(
        "distill", help="train a student from the teacher (distill/)", add_help=False
    )
    commands.add_parser("rules", help="render Prometheus SLO rules from `slo:`", add_help=False)
    commands.add_parser("loadgen", help="send digits traffic, optionally drifted", add_help=False)
    commands.add_parser(
        "retrain-worker",
        help="receive the retrain webhook; retrain, register and roll out",
        add_help=False,
    )
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
        "retrain-worker": lambda rest: importlib.import_module("kdgate.service.retrain_app").main(
            rest
        ),
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
