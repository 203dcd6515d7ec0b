"""Typed configuration: one YAML file, every key overridable by `KDGATE_*` environment variables.

    Settings
    ├── server    ServerSettings     bind address, body limit, onnxruntime threads
    ├── models    [ModelSettings]    students (versions + cards), teacher, traffic split, rollout
    ├── shadow    ShadowSettings     queue size, teacher batch size, capture, fidelity window
    ├── feedback  FeedbackSettings   recent predictions kept for labels (size, TTL)
    ├── slo       SloConfig          objectives, windows, hysteresis (monitoring/slo.py)
    ├── drift     DriftConfig        input drift job (monitoring/drift.py)
    ├── webhook   WebhookConfig      retrain webhook, signing secret, outbox (monitoring/webhook.py)
    ├── admin     AdminSettings      bearer token for /admin (admin is off without one)
    └── traffic   TrafficSourceSettings  the watched traffic file every process follows

Precedence: environment > YAML file > defaults. Nesting uses `__`
(`KDGATE_SERVER__PORT=9000`); lists are given as JSON (`KDGATE_MODELS='[...]'`).
Relative card paths in a file are relative to that file's directory; with no file the embedded
default serves the repository's `models/digits` pair. docs/configuration.md lists every key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

import kdgate
from kdgate.monitoring.drift import DriftConfig
from kdgate.monitoring.recorder import TEACHER_VERSION
from kdgate.monitoring.rollout_analysis import Criteria, StepSpec, parse_steps
from kdgate.monitoring.slo import SloConfig
from kdgate.monitoring.webhook import WebhookConfig

CONFIG_ENV_VAR = "KDGATE_CONFIG"

# Secrets that are obviously copied from an example rather than chosen.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "secret", "password", "placeholder", "todo", "xxx"}
)


# sticky_header: no header names a proxy may rewrite, drop or merge (RFC 9110 7.6.1 hop-by-hop
# and the message framing), and no name longer than any real one.
STICKY_HEADER_MAX = 64
NOT_ROUTE_KEYS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "host",
        "expect",
    }
)


def default_models_dir() -> Path:
    """The embedded model pair: package data when installed, `<repo>/models` in a checkout."""
    return kdgate.MODELS_DIR


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """HTTP server and onnxruntime session options."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0, description="request body limit")
    body_timeout_seconds: float = Field(
        default=10.0, gt=0.0, description="whole request body must arrive within this (else 408)"
    )
    onnx_intra_op_threads: int = Field(default=1, ge=1, description="onnxruntime intra-op pool")
    onnx_inter_op_threads: int = Field(default=1, ge=1, description="onnxruntime inter-op pool")
    warmup_runs: int = Field(default=50, ge=1, description="session runs before ready")
    batch_max_rows: int = Field(
        default=32,
        ge=1,
        description="micro-batching: most rows one run takes from concurrent requests; 1 = off",
    )
    graceful_shutdown_seconds: int = Field(default=30, ge=1)
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one object per line (time, level, logger, message)"
    )
    access_log: bool = Field(default=False, description="one line per request")
    max_in_flight: int = Field(
        default=256, ge=0, description="inference requests handled at once; more get 503; 0 = off"
    )
    request_timeout_seconds: float = Field(
        default=30.0, ge=0.0, description="inference deadline, then 503; 0 = off"
    )
    admin_port: int | None = Field(
        default=None, ge=0, le=65535, description="/admin, /metrics, /v1/hooks only here"
    )
    workers: int = Field(
        default=1, ge=1, le=64, description="worker processes serving the same port(s)"
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        if self.admin_port is not None and self.admin_port == self.port != 0:
            raise ValueError(f"admin_port must differ from port ({self.port})")
        return self


CPU_PROVIDER = "CPUExecutionProvider"


class SessionOptionsSettings(_Section):
    """onnxruntime `SessionOptions` of one model (service/runtime.py builds them).

    Null thread counts take the section's default: `server.onnx_*_threads` for a student,
    `teacher.intra_op_threads` (and one inter-op thread) for a local teacher.
    """

    intra_op_threads: int | None = Field(default=None, ge=0, description="0: one per core")
    inter_op_threads: int | None = Field(default=None, ge=0, description="0: one per core")
    graph_optimization_level: Literal[
        "disable_all", "enable_basic", "enable_extended", "enable_layout", "enable_all"
    ] = "enable_all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    # Off by default: a spinning pool thread busy-waits on the core the event loop needs.
    allow_spinning: bool = False
    # onnxruntime's own log on stderr: 0 verbose, 1 info, 2 warning, 3 error (a failed run on a
    # bad input is logged here too), 4 fatal only; null: onnxruntime's default (2).
    log_severity_level: int | None = Field(default=None, ge=0, le=4)
    # Any other key of `SessionOptions.add_session_config_entry`, by its onnxruntime name.
    config_entries: dict[str, str] = Field(default_factory=dict)

    @field_validator("graph_optimization_level", "execution_mode", mode="before")
    @classmethod
    def _enum_names(cls, value: Any) -> Any:
        # onnxruntime's own spelling (ORT_ENABLE_ALL, ORT_SEQUENTIAL) is accepted as well.
        return value.lower().removeprefix("ort_") if isinstance(value, str) else value


class OnnxSessionSettings(_Section):
    """Where and how onnxruntime runs one model: execution providers in order of preference,
    their options, and the session options. The providers must be available in the installed
    onnxruntime (`onnxruntime.get_available_providers()`), checked at start."""

    providers: list[str] = Field(default_factory=lambda: [CPU_PROVIDER], min_length=1)
    provider_options: dict[str, dict[str, str | int | float | bool]] = Field(
        default_factory=dict,
        description="per provider name, e.g. CUDAExecutionProvider: {device_id: 0}",
    )
    session_options: SessionOptionsSettings = Field(default_factory=SessionOptionsSettings)

    @model_validator(mode="after")
    def _options_for_listed_providers(self) -> Self:
        if len(set(self.providers)) != len(self.providers):
            raise ValueError(f"providers lists a provider twice: {self.providers}")
        unlisted = sorted(set(self.provider_options) - set(self.providers))
        if unlisted:
            raise ValueError(
                f"provider_options names {unlisted}, not in providers {self.providers}"
            )
        return self


class StudentSettings(OnnxSessionSettings):
    """One student version: an ONNX file described by its model card, and its onnxruntime."""

    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    card: Path

    @field_validator("version")
    @classmethod
    def _not_teacher(cls, version: str) -> str:
        # The teacher's label calibration is exported under version="teacher" (docs/metrics.md).
        if version == TEACHER_VERSION:
            raise ValueError(f"student version {version!r} is reserved for the teacher's series")
        return version


class BreakerSettings(_Section):
    """Circuit breaker of the teacher calls: open after consecutive failures, probe later."""

    failure_threshold: int = Field(default=5, ge=1)
    cooldown_seconds: float = Field(default=10.0, ge=0.0)


class TeacherSettings(OnnxSessionSettings):
    """The teacher: a local card (run by onnxruntime as configured), or a remote Open Inference
    Protocol endpoint."""

    card: Path | None = None
    url: str | None = None
    model: str | None = None
    model_version: str | None = None  # remote: pin this version on the teacher's server
    timeout_seconds: float = Field(default=2.0, gt=0.0, description="per teacher call")
    max_batch: int | None = Field(default=None, ge=1, description="rows per call; shadow.max_batch")
    intra_op_threads: int = Field(default=1, ge=1, description="local teacher's onnxruntime pool")
    input_map: dict[str, str] = Field(
        default_factory=dict,
        description="student input name -> the teacher's name for it, where they differ",
    )
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.card is None) == (self.url is None):
            raise ValueError("teacher needs exactly one of 'card' or 'url'")
        if self.url is not None and not self.model:
            raise ValueError("a remote teacher ('url') needs 'model', its name on that server")
        local_only = {"providers", "provider_options", "session_options"} & self.model_fields_set
        if self.url is not None and local_only:
            raise ValueError(
                f"{sorted(local_only)} apply to a local teacher ('card'); a remote teacher runs "
                "on its own server"
            )
        return self


class TrafficSettings(_Section):
    """Canary split between student versions, sticky routing and the shadow fraction."""

    weights: dict[str, int] = Field(default_factory=dict)
    # An HTTP header name (RFC 9110 token characters).
    sticky_header: str = Field(
        default="x-kdgate-route-key", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
    )
    shadow_fraction: float = Field(default=0.1, ge=0.0, le=1.0)

    @field_validator("weights")
    @classmethod
    def _percentages(cls, weights: dict[str, int]) -> dict[str, int]:
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0, got {weights}")
        if weights and sum(weights.values()) != 100:
            raise ValueError(f"weights must sum to 100, got {sum(weights.values())}: {weights}")
        return weights

    @field_validator("sticky_header")
    @classmethod
    def _routable(cls, header: str) -> str:
        # ASGI header names arrive lower-cased.
        header = header.lower()
        if len(header) > STICKY_HEADER_MAX:
            raise ValueError(f"sticky_header is over {STICKY_HEADER_MAX} characters")
        if header in NOT_ROUTE_KEYS:
            raise ValueError(
                f"sticky_header {header!r} describes the connection or the message framing, "
                "not the caller (proxies change or drop it); use a header of your own, such as "
                "x-kdgate-route-key"
            )
        return header


# A step of `models[].rollout.steps`: "dark", a candidate weight, or an object (StepSpec fields).
RawStep = str | int | dict[str, Any]
DEFAULT_STEPS: tuple[RawStep, ...] = ("dark", 5, 25, 100)


class RolloutSettings(_Section):
    """How a candidate version is rolled out (docs/rollouts.md): its steps, the defaults of the
    steps that do not say, and the criteria of every step's analysis. `candidate` set: a rollout
    of that version starts when the server does (unless the traffic file already holds one of
    it, in any state)."""

    candidate: str | None = None
    steps: list[RawStep] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    min_samples: int = Field(default=500, ge=1, description="paired rows a step needs at least")
    min_seconds: float = Field(default=60.0, ge=0.0, description="the least a step lasts")
    max_seconds: float = Field(default=1800.0, gt=0.0, description="then an undecided step fails")
    # Frozen, so one shared default is safe (validated: its fields' defaults are positional).
    criteria: Criteria = Criteria.model_validate({})

    @model_validator(mode="after")
    def _steps_parse(self) -> Self:
        self.step_specs()  # bad steps fail at start, not when a rollout begins
        return self

    def step_defaults(self) -> dict[str, Any]:
        return {
            "min_samples": self.min_samples,
            "min_seconds": self.min_seconds,
            "max_seconds": self.max_seconds,
        }

    def step_specs(self, raw: list[RawStep] | None = None) -> list[StepSpec]:
        """`raw` (else `steps`) parsed with this section's defaults; ValueError saying why."""
        return parse_steps(self.steps if raw is None else raw, self.step_defaults())


class ModelSettings(_Section):
    """One served model: its student versions, its teacher and how traffic is split."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    students: list[StudentSettings] = Field(min_length=1)
    teacher: TeacherSettings | None = None
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)

    @model_validator(mode="after")
    def _known_versions(self) -> Self:
        versions = [s.version for s in self.students]
        if len(set(versions)) != len(versions):
            raise ValueError(f"model {self.name!r}: duplicate student versions {versions}")
        unknown = sorted(set(self.traffic.weights) - set(versions))
        if unknown:
            raise ValueError(
                f"model {self.name!r}: traffic weights name unknown versions {unknown}; "
                f"students are {versions}"
            )
        if not self.traffic.weights:
            # One student and no split: it takes everything.
            if len(versions) > 1:
                raise ValueError(
                    f"model {self.name!r} has {len(versions)} students: traffic.weights must "
                    "say how to split between them"
                )
            traffic = self.traffic.model_copy(update={"weights": {versions[0]: 100}})
            object.__setattr__(self, "traffic", traffic)
        return self


class CaptureSettings(_Section):
    """On-disk capture of shadowed (input, teacher logits) pairs; off while `dir` is null."""

    dir: Path | None = None  # one subdirectory per model; relative to the working directory
    max_rows: int = Field(default=100_000, ge=1)
    segment_rows: int = Field(default=4096, ge=1)
    flush_seconds: float = Field(default=60.0, gt=0.0)

    @model_validator(mode="after")
    def _segments_fit(self) -> Self:
        if self.segment_rows > self.max_rows:
            raise ValueError("capture.segment_rows must not exceed capture.max_rows")
        return self


class ShadowSettings(_Section):
    """Shadow traffic to the teacher: bounded queue, batch size per teacher call."""

    queue_size: int = Field(default=4096, ge=1)
    max_batch: int = Field(default=64, ge=1)
    linger_seconds: float = Field(default=0.01, ge=0.0, description="wait for rows after idle")
    stop_grace_seconds: float = Field(default=5.0, ge=0.0, description="drain time at shutdown")
    capture: CaptureSettings = Field(default_factory=CaptureSettings)

    @model_validator(mode="before")
    @classmethod
    def _one_window(cls, data: Any) -> Any:
        if isinstance(data, dict) and "window_seconds" in data:
            raise ValueError(
                "shadow.window_seconds is gone: GET /v1/fidelity, GET /v1/slo and the SLO monitor "
                "share one window, slo.window_seconds; set that instead"
            )
        return data


class FeedbackSettings(_Section):
    """Recent predictions kept for `POST /v2/models/{m}/feedback`, per model."""

    max_size: int = Field(default=50_000, ge=1, description="predictions held")
    ttl_seconds: float = Field(default=3600.0, gt=0.0, description="how long labels may take")


def _reject_placeholder(secret: SecretStr | None, what: str) -> SecretStr | None:
    if secret is None:
        return None
    value = secret.get_secret_value().strip()
    if not value or value.lower() in PLACEHOLDER_SECRETS or value.startswith("<"):
        raise ValueError(f"{what} is empty or a placeholder; set a real secret or leave it null")
    return secret


class AdminSettings(_Section):
    """Admin API bearer token; the admin routes are off while it is null."""

    token: SecretStr | None = None
    # Holds the traffic file `traffic.json` unless `traffic.file` names another
    # (service/traffic_store.py); relative to the working directory.
    state_dir: Path = Path("state")
    # The most one change may take: loading a version (reading its files, building and warming
    # it), or waiting for the change before it to finish. Past it: 504, and the lock is free.
    timeout_seconds: float = Field(default=120.0, gt=0.0)

    @field_validator("token")
    @classmethod
    def _real_token(cls, token: SecretStr | None) -> SecretStr | None:
        return _reject_placeholder(token, "admin.token")


class TrafficSourceSettings(_Section):
    """The traffic file: the one source of every model's versions and split (docs/traffic.md).

    Every process polls it and applies a change within `poll_seconds` (plus the load of a new
    version); the admin API writes it. Where it names a model it wins over `models[].traffic`
    and `models[].students` (logged at start, `kdgate_traffic_source_differs`).
    """

    # Null: `<admin.state_dir>/traffic.json`. Relative to the working directory.
    file: Path | None = None
    # True for a file only its owner changes (a ConfigMap mount): admin changes answer 409.
    # A directory the process cannot write (a read-only mount) counts as read-only too.
    read_only: bool = False
    poll_seconds: float = Field(default=1.0, gt=0.0, le=5.0)


def default_model_list() -> list[ModelSettings]:
    """The embedded default: the digits student v1 and its teacher, from the repository."""
    digits = default_models_dir() / "digits"
    return [
        ModelSettings(
            name="digits",
            students=[StudentSettings(version="1", card=digits / "student-v1.card.json")],
            teacher=TeacherSettings(card=digits / "teacher.card.json"),
        )
    ]


class Settings(BaseSettings):
    """The whole kdgate configuration (see the module docstring for sources and precedence)."""

    model_config = SettingsConfigDict(
        env_prefix="KDGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    models: list[ModelSettings] = Field(default_factory=default_model_list, min_length=1)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    slo: SloConfig = Field(default_factory=SloConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    traffic: TrafficSourceSettings = Field(default_factory=TrafficSourceSettings)

    @property
    def traffic_file(self) -> Path:
        """The traffic file this process follows (`traffic.file`, else the admin state file)."""
        return self.traffic.file or self.admin.state_dir / "traffic.json"

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names {names}")
        return models

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values; the environment must win over it.
        return (env_settings, init_settings)


def _resolve_cards(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative `card` paths in a parsed config file relative to the file's directory."""

    def resolve(entry: Any) -> Any:
        if isinstance(entry, dict) and isinstance(entry.get("card"), str):
            card = Path(entry["card"])
            return {**entry, "card": card if card.is_absolute() else base / card}
        return entry

    for model in data.get("models") or []:
        if not isinstance(model, dict):
            continue
        if isinstance(model.get("students"), list):
            model["students"] = [resolve(s) for s in model["students"]]
        if "teacher" in model:
            model["teacher"] = resolve(model["teacher"])
    return data


def load_settings(
    config_file: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from `config_file` (else `$KDGATE_CONFIG`, else the embedded default).

    `environ` is only consulted for `KDGATE_CONFIG`; key overrides always come from the process
    environment (pydantic-settings reads it).
    """
    env = os.environ if environ is None else environ
    path = config_file if config_file is not None else env.get(CONFIG_ENV_VAR)
    if not path:
        return Settings()
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config file must be a YAML mapping")
    return Settings(**_resolve_cards(data, path.resolve().parent))
