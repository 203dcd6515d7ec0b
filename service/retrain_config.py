"""The retrain worker's config: one YAML file, secrets from `KDGATE_RETRAIN_*` variables.

    RetrainWorkerSettings
    ├── listen     host, port of the receiver (POST /webhook, GET /jobs, /healthz, /metrics)
    ├── secret     the webhook secret `whsec_...` the gateway signs with (KDGATE_RETRAIN_SECRET)
    ├── gateway    url + admin token of `kdgate serve` (KDGATE_RETRAIN_GATEWAY__TOKEN)
    ├── work_dir   the job queue (SQLite) and one directory per job, kept after the job
    ├── rollout    extra fields of the rollout request (steps, criteria); none: the model's own
    └── models     per model: `kind: distill` (kdgate distill from the capture) or
                   `kind: command` (the user's command, then `kdgate import`)

Precedence: environment > YAML file > defaults; nesting uses `__`. Relative paths in the file
are relative to its directory. Secrets are `SecretStr`: masked in repr, str and logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kdgate.monitoring.webhook import signing_key
from kdgate.service.settings import PLACEHOLDER_SECRETS

CONFIG_ENV_VAR = "KDGATE_RETRAIN_CONFIG"
ENV_PREFIX = "KDGATE_RETRAIN_"
# Paths in the file that are resolved against the file's directory.
_PATH_KEYS = ("teacher_card", "teacher", "sample", "cwd")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535, description="0 picks a free port")


class GatewaySettings(_Section):
    """Where the gateway's admin API is, and its bearer token."""

    url: str
    token: SecretStr
    # Loading a version reads, verifies and warms it: the gateway's own admin.timeout_seconds.
    timeout_seconds: float = Field(default=120.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an http(s) URL of the gateway, got {url!r}")
        return url.rstrip("/")

    @field_validator("token")
    @classmethod
    def _real_token(cls, token: SecretStr) -> SecretStr:
        if token.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS | {""}:
            raise ValueError("gateway.token is a placeholder; give the gateway's admin.token")
        return token


class _Job(_Section):
    # A breach is noticed after a few hundred samples, often fewer than a student needs:
    # the job waits until the capture holds `min_capture_rows` (or `capture_wait_seconds`
    # have passed; then it trains on what there is, with a warning).
    min_capture_rows: int = Field(default=0, ge=0, description="wait for this many rows")
    capture_wait_seconds: float = Field(default=600.0, ge=0)


class DistillJob(_Job):
    """A pair `kdgate distill` trains (digits): a new student from the capture, mixed with the
    train split, judged by the distill gates."""

    kind: Literal["distill"]
    teacher_card: Path
    epochs: int = Field(default=200, ge=1, description="student epochs")
    deadline_seconds: float = Field(default=3600.0, gt=0)
    extra_args: list[str] = Field(default_factory=list, description="more `kdgate distill` flags")


class CommandJob(_Job):
    """Any other pair: the user's command writes `$KDGATE_OUT/student.onnx`, then it is imported
    against `teacher` (the served teacher's ONNX file) as `kdgate import` does."""

    kind: Literal["command"]
    command: list[str] = Field(min_length=1, description="argv; run without a shell")
    teacher: Path
    sample: Path | None = Field(default=None, description="for the card's figures")
    cwd: Path | None = Field(default=None, description="default: the config file's directory")
    deadline_seconds: float = Field(default=3600.0, gt=0)
    input_map: dict[str, str] = Field(default_factory=dict)
    scores_output: str | None = None
    output_kind: Literal["logits", "probabilities", "regression"] | None = None
    class_labels: list[str] | None = None
    min_agreement: float | None = Field(
        default=None, ge=0, le=1, description="refuse a student below it on the sample"
    )


ModelJob = Annotated[DistillJob | CommandJob, Field(discriminator="kind")]


class RetrainWorkerSettings(BaseSettings):
    """The whole worker config (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    listen: ListenSettings = Field(default_factory=ListenSettings)
    secret: SecretStr
    tolerance_seconds: float = Field(default=300.0, gt=0, description="webhook-timestamp skew")
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    gateway: GatewaySettings
    work_dir: Path = Path("var/retrain")
    parallel: int = Field(default=1, ge=1, le=16, description="jobs at once (other models)")
    max_attempts: int = Field(
        default=2, ge=1, description="runs of a job a restart interrupted, then failed"
    )
    poll_seconds: float = Field(default=1.0, gt=0)
    rollout: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, ModelJob] = Field(min_length=1)

    @field_validator("secret")
    @classmethod
    def _signing_secret(cls, secret: SecretStr) -> SecretStr:
        signing_key(secret.get_secret_value())  # the webhook's own rules and message
        return secret

    @field_validator("rollout")
    @classmethod
    def _no_candidate(cls, rollout: dict[str, Any]) -> dict[str, Any]:
        if "candidate" in rollout:
            raise ValueError("rollout.candidate is the new version: set by the worker")
        return rollout

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # the YAML arrives as init values: env wins


def load_worker_settings(
    config_file: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> RetrainWorkerSettings:
    """The settings from `config_file` (else `$KDGATE_RETRAIN_CONFIG`) and the environment.

    Raises OSError, yaml.YAMLError, pydantic.ValidationError or ValueError; none of their
    messages holds a secret value (`include_input=False` when rendering validation errors).
    """
    env = os.environ if environ is None else environ
    path = config_file if config_file is not None else env.get(CONFIG_ENV_VAR)
    if not path:
        raise ValueError(f"no config: pass --config FILE or set {CONFIG_ENV_VAR}")
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config file must be a YAML mapping")
    base = path.resolve().parent
    for job in (data.get("models") or {}).values():
        if isinstance(job, dict):
            for key in _PATH_KEYS:
                if isinstance(job.get(key), str):
                    job[key] = base / job[key]
            if job.get("kind") == "command":
                job.setdefault("cwd", base)
    if isinstance(data.get("work_dir"), str):
        data["work_dir"] = base / data["work_dir"]
    return RetrainWorkerSettings(**data)
