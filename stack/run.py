"""The docker-compose stack without Docker: every process on 127.0.0.1, the committed configs.

    with running_stack(workdir, secrets) as stack:
        stack.gateway.url, stack.prometheus.url, stack.alertmanager.url, stack.receiver.url

Order follows who must know whose address: receiver -> teacher (a `kdgate serve` of the teacher
card, deploy/teacher.yaml) -> gateway (deploy/gateway.yaml, shadowing to that teacher, posting
retrain webhooks to the receiver) -> Alertmanager (deploy/alertmanager/alertmanager.yml: retrain
route to the gateway's hook, page/ticket to the receiver) -> Prometheus
(deploy/prometheus/prometheus.yml with its rules). Only addresses, timings and secrets change;
`gateway_overrides` merges test-sized windows into the gateway's config, `model_overrides` into
each of its models (e.g. a shadow fraction of 1).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stack.configs import ROOT, write_alertmanager_config, write_prometheus_config
from stack.process import ALERTMANAGER, KDGATE, PROMETHEUS, Listening, listening, without_kdgate_env
from stack.receiver import Receiver, webhook_receiver

DEPLOY = ROOT / "deploy"


@dataclass(frozen=True)
class Secrets:
    """The stack's two secrets: the admin/hook bearer token and the webhook signing secret."""

    admin_token: str
    webhook_secret: str


@dataclass(frozen=True)
class Ports:
    """Where each process listens; 0 = any free port (tests), fixed ones for `make stack`."""

    gateway: int = 0
    teacher: int = 0
    prometheus: int = 0
    alertmanager: int = 0
    receiver: int = 0


@dataclass
class Stack:
    receiver: Receiver
    teacher: Listening
    gateway: Listening
    alertmanager: Listening
    prometheus: Listening
    configs: dict[str, Path] = field(default_factory=dict)


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, recursively for mappings (lists are replaced)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_kdgate_config(source: Path, path: Path, overrides: Mapping[str, Any]) -> Path:
    """A deploy/*.yaml kdgate config with absolute card paths and `overrides` merged in."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    for model in config["models"]:
        for entry in [*model.get("students", []), model.get("teacher") or {}]:
            if "card" in entry:
                entry["card"] = str((source.parent / entry["card"]).resolve())
    config = merge(config, overrides)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _kdgate(config: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdgate.service.cli",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextmanager
def running_stack(
    workdir: Path,
    secrets: Secrets,
    *,
    ports: Ports = Ports(),
    interval: str = "1s",
    gateway_overrides: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    slo_rules: Path | None = None,
    report: Callable[[str], None] | None = None,
) -> Iterator[Stack]:
    """Start the whole stack under `workdir`; stop every process (reverse order) on exit.

    `report` gets one line per webhook or notification the receiver gets (stack/receiver.py).
    """
    prometheus_bin = shutil.which("prometheus")
    alertmanager_bin = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if prometheus_bin is None or alertmanager_bin is None:
        raise RuntimeError("prometheus and prometheus-alertmanager are needed: make sysdeps")
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as processes:
        receiver = processes.enter_context(
            webhook_receiver(secrets.webhook_secret, port=ports.receiver, report=report)
        )
        teacher_config = write_kdgate_config(
            DEPLOY / "teacher.yaml", workdir / "teacher.yaml", {"server": {"port": ports.teacher}}
        )
        teacher = processes.enter_context(
            listening(
                _kdgate(teacher_config, ports.teacher), KDGATE, env=without_kdgate_env({}), cwd=ROOT
            )
        )
        teacher_model = yaml.safe_load(teacher_config.read_text())["models"][0]["name"]
        state = workdir / "gateway-state"  # the outbox and persisted traffic live here
        own = {
            "webhook": {"url": receiver.url, "outbox_path": str(state / "outbox.sqlite3")},
            "admin": {"state_dir": str(state)},
        }
        overrides = merge(own, gateway_overrides or {})
        gateway_config = write_kdgate_config(
            DEPLOY / "gateway.yaml", workdir / "gateway.yaml", overrides
        )
        config = yaml.safe_load(gateway_config.read_text())
        for i, model in enumerate(config["models"]):
            if "url" in (model.get("teacher") or {}):
                model["teacher"] = {**model["teacher"], "url": teacher.url, "model": teacher_model}
            config["models"][i] = merge(model, model_overrides or {})
        gateway_config.write_text(yaml.safe_dump(config, sort_keys=False))
        gateway_env = without_kdgate_env(
            {
                "KDGATE_ADMIN__TOKEN": secrets.admin_token,
                "KDGATE_WEBHOOK__SECRET": secrets.webhook_secret,
            }
        )
        gateway = processes.enter_context(
            listening(_kdgate(gateway_config, ports.gateway), KDGATE, env=gateway_env, cwd=ROOT)
        )
        token_file = workdir / "admin-token"
        token_file.write_text(secrets.admin_token)
        token_file.chmod(0o600)
        gateway_address = f"127.0.0.1:{gateway.port}"
        am_config = write_alertmanager_config(
            workdir / "alertmanager.yml",
            gateway=gateway_address,
            receiver=f"127.0.0.1:{receiver.port}",
            token_file=token_file,
        )
        alertmanager = processes.enter_context(
            listening(
                [
                    alertmanager_bin,
                    f"--config.file={am_config}",
                    f"--storage.path={workdir / 'alertmanager'}",
                    f"--web.listen-address=127.0.0.1:{ports.alertmanager}",
                    "--cluster.listen-address=",
                ],
                ALERTMANAGER,
            )
        )
        prom_config = write_prometheus_config(
            workdir / "prometheus.yml",
            gateway=gateway_address,
            teacher=f"127.0.0.1:{teacher.port}",
            alertmanager=f"127.0.0.1:{alertmanager.port}",
            interval=interval,
            slo_rules=slo_rules,
        )
        prometheus = processes.enter_context(
            listening(
                [
                    prometheus_bin,
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={workdir / 'prometheus'}",
                    f"--web.listen-address=127.0.0.1:{ports.prometheus}",
                ],
                PROMETHEUS,
            )
        )
        yield Stack(
            receiver,
            teacher,
            gateway,
            alertmanager,
            prometheus,
            {
                "teacher": teacher_config,
                "gateway": gateway_config,
                "alertmanager": am_config,
                "prometheus": prom_config,
            },
        )
