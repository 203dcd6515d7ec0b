"""Check a config for the operator: one line per problem, or the effective config.

    load_checked(path)     Settings, or ConfigError("<file>: <key path>: <reason>"): also card
                           files missing and execution providers onnxruntime lacks
    effective_yaml(s)      the config as YAML after defaults and KDGATE_* overrides, secrets masked
    missing_extra(exc)     "pip install 'kdgate[train]'" for an ImportError of an optional part

The CLI prints a ConfigError as one line and exits 2, like a usage error: a YAML syntax error
names its line and column, a wrong key or value its dotted path (`models[0].students[0].card`),
and a value coming from the environment its variable. Input values are never echoed: they may
be secrets (a mistyped admin token is still a token).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdgate.service.cards import load_card, model_path
from kdgate.service.settings import (
    CONFIG_ENV_VAR,
    OnnxSessionSettings,
    Settings,
    load_settings,
)

ENV_PREFIX = "KDGATE_"

# Top-level module -> the kdgate extra that installs it (pyproject.toml).
EXTRAS = {
    "torch": "train",
    "sklearn": "train",
    "onnx": "train",
    "tqdm": "train",
    "evidently": "drift",
    "pandas": "drift",
    "opentelemetry": "otel",
    "matplotlib": "docs",
}


class ConfigError(Exception):
    """A config that cannot serve; `str()` is the one line to show."""


def config_path(config_file: Path | str | None, environ: Mapping[str, str]) -> Path | None:
    """The file `load_settings` reads: `config_file`, else `$KDGATE_CONFIG`, else none."""
    path = config_file if config_file is not None else environ.get(CONFIG_ENV_VAR)
    return Path(path) if path else None


def load_checked(
    config_file: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """`load_settings`, plus every card file present and readable; else a one-line ConfigError."""
    env = os.environ if environ is None else environ
    path = config_path(config_file, env)
    where = str(path) if path else "(embedded default config)"
    try:
        settings = load_settings(path, env)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # Only the problem, never the snippet yaml would quote (the line may hold a secret).
        raise ConfigError(
            f"{where}: YAML syntax error at {at}{exc.problem or exc.context}"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML: {type(exc).__name__}") from None
    except ValidationError as exc:
        problems = [_problem(error, env) for error in exc.errors(include_input=False)]
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None
    except ValueError as exc:  # load_settings' own checks (not a mapping)
        raise ConfigError(_one_line(str(exc))) from None
    problems = card_problems(settings) + provider_problems(settings)
    if problems and path is None:
        # A wheel installed without its package data: say what to write instead.
        problems.append(
            "write a config naming your model cards and pass it with --config FILE "
            "(or $KDGATE_CONFIG)"
        )
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return settings


def card_problems(settings: Settings) -> list[str]:
    """Missing or unreadable card and model files, each as `<key path>: <reason>` (students
    with a share of the traffic and teachers)."""
    cards: list[tuple[str, Path]] = []
    for i, model in enumerate(settings.models):
        # A version at weight 0 that cannot load is served as "not loaded" (service/state.py).
        cards += [
            (f"models[{i}].students[{j}].card", s.card)
            for j, s in enumerate(model.students)
            if model.traffic.weights.get(s.version, 0)
        ]
        if model.teacher is not None and model.teacher.card is not None:
            cards.append((f"models[{i}].teacher.card", model.teacher.card))
    problems = []
    for key, card in cards:
        if not card.is_file():
            problems.append(f"{key}: no such file: {card}")
            continue
        try:
            onnx_file = model_path(card, load_card(card))
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            problems.append(f"{key}: not a readable model card ({card}): {_first_line(exc)}")
            continue
        if not onnx_file.is_file():
            problems.append(f"{key}: the model file it names is missing: {onnx_file}")
    return problems


def provider_problems(settings: Settings) -> list[str]:
    """Execution providers the installed onnxruntime lacks, each as `<key path>: <reason>`
    naming those it has (onnxruntime itself would only warn and run on the CPU)."""
    from kdgate.service.runtime import available_providers  # onnxruntime: only when checking

    available = available_providers()
    configured: list[tuple[str, OnnxSessionSettings]] = []
    for i, model in enumerate(settings.models):
        configured += [(f"models[{i}].students[{j}]", s) for j, s in enumerate(model.students)]
        if model.teacher is not None and model.teacher.card is not None:
            configured.append((f"models[{i}].teacher", model.teacher))
    problems = []
    for key, section in configured:
        missing = [name for name in section.providers if name not in available]
        if missing:
            problems.append(
                f"{key}.providers: {', '.join(missing)} not available in this onnxruntime; "
                f"available: {', '.join(available)}"
            )
    return problems


def _problem(error: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    loc: Sequence[str | int] = error["loc"]
    key = key_path(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    variable = _env_variable(loc, environ)
    source = f" (from {variable})" if variable else ""
    return f"{key or '(top level)'}{source}: {_one_line(message)}"


def key_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a config key path: ("models", 0, "card") -> models[0].card."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _env_variable(loc: Sequence[str | int], environ: Mapping[str, str]) -> str | None:
    """The KDGATE_* variable that set the value at `loc`, if one did (the longest match)."""
    names = [str(part) for part in loc if isinstance(part, str)]
    for end in range(len(names), 0, -1):
        variable = ENV_PREFIX + "__".join(names[:end]).upper()
        if variable in environ:
            return variable
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def effective_yaml(settings: Settings) -> str:
    """The settings as YAML, every `SecretStr` shown as `**********`."""
    data = settings.model_dump(mode="json")  # pydantic renders SecretStr masked in this mode
    return yaml.safe_dump(data, sort_keys=False)


def missing_extra(exc: ImportError) -> str | None:
    """One line naming the extra that provides the missing module, or None if it is not ours."""
    name = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return f"kdgate: this needs the '{extra}' extra ({name} is not installed): " + (
        f"pip install 'kdgate[{extra}]'"
    )
