"""The traffic file: every model's versions and split, the one source every process follows.

    # traffic.file (YAML or JSON); default <admin.state_dir>/traffic.json
    models:
      digits:
        versions:                       # card paths relative to this file's directory
          - {version: "1", card: /models/digits/student-v1.card.json}
          - {version: "2", card: /models/digits/student-v2.card.json}
        weights: {"1": 90, "2": 10}
        sticky_header: x-kdgate-route-key
        shadow_fraction: 0.1
        previous_weights: {"1": 100}    # optional: what `rollback` returns to
        rollout:                        # optional: the model's latest rollout (RolloutRecord)
          {candidate: "2", incumbent: "1", state: running, step: 1, steps: [...], ...}

Precedence: for a model the file names, the file wins over the config's `students` and
`traffic`; a model it does not name serves the config. `restore` says, per model, which keys
the two sources disagree on, so the start can log it (never silently). The older state-file
spelling (`students` + a nested `traffic` object) is read as the same thing.

Writes are atomic: a temp file in the directory of the file's resolved target, fsync,
`os.replace`, fsync of the directory, so a reader (this process's watcher, another replica's)
sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdgate.monitoring.rollout_analysis import Criteria, StepSpec
from kdgate.service.settings import ModelSettings, Settings, StudentSettings, TrafficSettings

MAX_BYTES = 1024 * 1024  # a traffic file is a few kB
# A write refused for these reasons is a read-only source (409), not a failure (500).
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


RolloutState = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE_STATES = frozenset({"running", "paused"})


class RolloutRecord(BaseModel):
    """A model's latest rollout, as the traffic file holds it (service/rollouts.py drives it).

    Times are unix seconds. `analysis` is the step analysis that decided the last transition
    (`{"decision", "samples", "reason", "checks": [...]}`), `reason` why the rollout ended.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate: str = Field(min_length=1)
    incumbent: str = Field(min_length=1)
    steps: list[StepSpec] = Field(min_length=1)
    # Frozen, so one shared default is safe (validated: its fields' defaults are positional).
    criteria: Criteria = Criteria.model_validate({})
    step: int = Field(default=0, ge=0)
    state: RolloutState = "running"
    started_at: float
    step_started_at: float
    finished_at: float | None = None
    analysis: dict[str, Any] | None = None
    reason: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.candidate == self.incumbent:
            raise ValueError(f"rollout candidate and incumbent are both {self.candidate!r}")
        if self.step >= len(self.steps):
            raise ValueError(f"rollout step {self.step} of {len(self.steps)} steps")
        return self

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def weight(self) -> int:
        """The candidate's weight at the current step."""
        return self.steps[self.step].weight


class TrafficEntry(BaseModel):
    """One model's versions and split, as the traffic file holds them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    versions: list[StudentSettings] = Field(min_length=1)
    weights: dict[str, int] = Field(default_factory=dict)
    sticky_header: str = TrafficSettings.model_fields["sticky_header"].default
    shadow_fraction: float = TrafficSettings.model_fields["shadow_fraction"].default
    previous_weights: dict[str, int] | None = None
    rollout: RolloutRecord | None = None

    @model_validator(mode="before")
    @classmethod
    def _state_file_spelling(cls, data: Any) -> Any:
        # The admin state file before the traffic file: {"students": [...], "traffic": {...}}.
        if isinstance(data, dict) and "students" in data:
            data = dict(data)
            data["versions"] = data.pop("students")
            data.update(data.pop("traffic", None) or {})
        return data

    @model_validator(mode="after")
    def _one_model(self) -> Self:
        # The same rules as a model of the config (known versions, weights summing to 100).
        model = ModelSettings(name="m", students=self.versions, traffic=self.traffic)
        # Every version listed, those left out at 0, so equal splits compare equal.
        weights = {s.version: model.traffic.weights.get(s.version, 0) for s in self.versions}
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "sticky_header", model.traffic.sticky_header)  # lower-cased
        rollout = self.rollout
        if rollout is not None and rollout.active:
            missing = sorted({rollout.candidate, rollout.incumbent} - set(weights))
            if missing:
                raise ValueError(f"the running rollout names versions {missing} not listed")
        return self

    @property
    def traffic(self) -> TrafficSettings:
        return TrafficSettings(
            weights=self.weights,
            sticky_header=self.sticky_header,
            shadow_fraction=self.shadow_fraction,
        )

    @classmethod
    def of(cls, model: ModelSettings, previous: dict[str, int] | None = None) -> TrafficEntry:
        """A model of the config as a traffic file entry."""
        return cls(
            versions=model.students,
            **model.traffic.model_dump(),
            previous_weights=previous,
        )

    def cards(self) -> dict[str, Path]:
        return {s.version: s.card for s in self.versions}


class TrafficDocument(BaseModel):
    """The whole traffic file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    models: dict[str, TrafficEntry] = Field(default_factory=dict)


class Snapshot(NamedTuple):
    """What the file looked like at one poll: `key` changes whenever anything about it does."""

    key: tuple[object, ...]
    data: bytes | None  # None: no file


@dataclass(frozen=True)
class Restored:
    """The settings to start with, and per model the keys where file and config disagree."""

    settings: Settings
    document: TrafficDocument
    differences: dict[str, list[str]]


class TrafficStore:
    """Reads, parses and atomically writes the traffic file at `path`."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only

    def snapshot(self) -> Snapshot:
        """The file's bytes, with its resolved target, inode, mtime and sha256 (blocking).

        A Kubernetes ConfigMap volume changes by swapping a symlink (`..data`) to a new
        directory: the path stays, the resolved target and the content change.
        """
        target = os.path.realpath(self.path)
        try:
            with open(self.path, "rb") as fh:
                info = os.fstat(fh.fileno())
                data = fh.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return Snapshot(("missing", target), None)
        digest = hashlib.sha256(data).hexdigest()
        return Snapshot((target, info.st_ino, info.st_mtime_ns, info.st_size, digest), data)

    def parse(self, data: bytes) -> TrafficDocument:
        """The document in `data`; ValueError naming the file and the first problem."""
        if len(data) > MAX_BYTES:
            raise ValueError(f"{self.path} is over {MAX_BYTES} bytes; a traffic file is a few kB")
        try:
            raw = yaml.safe_load(data) or {}
            if not isinstance(raw, dict):
                raise ValueError("not a mapping")
            return _with_cards_under(TrafficDocument.model_validate(raw), self.path.parent)
        except yaml.YAMLError as exc:
            reason = f"not YAML/JSON: {type(exc).__name__}"
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            reason = f"{where}: {first['msg'].removeprefix('Value error, ')}"
        except ValueError as exc:
            reason = str(exc)
        raise ValueError(f"{self.path} is not a valid traffic file: {reason}")

    def read(self) -> TrafficDocument | None:
        """The document, or None when there is no file (blocking)."""
        data = self.snapshot().data
        return None if data is None else self.parse(data)

    def writable(self) -> str | None:
        """Why admin changes cannot be written here, or None when they can."""
        if self.read_only:
            return f"traffic.read_only is set for {self.path}"
        directory = Path(os.path.realpath(self.path)).parent
        if directory.is_dir() and not os.access(directory, os.W_OK):
            return f"{directory} is read-only here (a ConfigMap or read-only mount)"
        return None

    def write(self, document: TrafficDocument) -> None:
        """Replace the file with `document` (blocking: fsyncs; call it from a worker thread).

        Writes into the resolved target's directory, so a symlinked file stays a symlink.
        """
        target = Path(os.path.realpath(self.path))
        directory = target.parent
        directory.mkdir(parents=True, exist_ok=True)
        content = document.model_dump(mode="json", exclude_none=True)
        if target.suffix in (".yaml", ".yml"):
            data = yaml.safe_dump(content, sort_keys=False).encode()
        else:
            data = orjson.dumps(content, option=orjson.OPT_INDENT_2) + b"\n"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename itself is only durable once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def restore(self, settings: Settings) -> Restored:
        """`settings` with each model the file names taken from the file (blocking).

        ValueError for a file that is invalid, or whose entry for a model does not fit it.
        """
        document = self.read() or TrafficDocument()
        models: list[ModelSettings] = []
        differences: dict[str, list[str]] = {}
        for model in settings.models:
            entry = document.models.get(model.name)
            if entry is None:
                models.append(model)
                continue
            try:
                merged = ModelSettings.model_validate(
                    {**model.model_dump(), "students": entry.versions, "traffic": entry.traffic}
                )
            except ValidationError as exc:
                raise ValueError(
                    f"{self.path}: traffic of model {model.name!r} does not fit the config: "
                    f"{exc.errors()[0]['msg']}"
                ) from None
            models.append(merged)
            found = differing_keys(model, entry)
            if found:
                differences[model.name] = found
        entries = {m.name: document.models.get(m.name) or TrafficEntry.of(m) for m in models}
        # Entries of models this config does not serve are kept, so a write does not lose them.
        entries.update({n: e for n, e in document.models.items() if n not in entries})
        return Restored(
            settings.model_copy(update={"models": models}),
            TrafficDocument(models=entries),
            differences,
        )


def differing_keys(model: ModelSettings, entry: TrafficEntry) -> list[str]:
    """Where the config's model and the file's entry disagree, one `key: config X, file Y` each."""
    found = []
    config_cards = {s.version: s.card for s in model.students}
    file_cards = entry.cards()
    if list(config_cards) != list(file_cards):
        found.append(f"students: config {list(config_cards)}, file {list(file_cards)}")
    for version in config_cards.keys() & file_cards.keys():
        if config_cards[version] != file_cards[version]:
            found.append(
                f"card of version {version!r}: config {config_cards[version]}, "
                f"file {file_cards[version]}"
            )
    traffic = entry.traffic
    for key in ("weights", "sticky_header", "shadow_fraction"):
        ours, theirs = getattr(model.traffic, key), getattr(traffic, key)
        if key == "weights":  # a version left out has weight 0
            ours = {v: w for v, w in ours.items() if w}
            theirs = {v: w for v, w in theirs.items() if w}
        if ours != theirs:
            found.append(f"{key}: config {ours}, file {theirs}")
    return found


def _with_cards_under(document: TrafficDocument, base: Path) -> TrafficDocument:
    """Relative card paths made relative to the traffic file's directory."""

    def absolute(student: StudentSettings) -> StudentSettings:
        if student.card.is_absolute():
            return student
        return student.model_copy(update={"card": base.absolute() / student.card})

    models = {
        name: entry.model_copy(update={"versions": [absolute(s) for s in entry.versions]})
        for name, entry in document.models.items()
    }
    return document.model_copy(update={"models": models})
