"""The traffic state file: what the admin API changed, kept across restarts.

    <admin.state_dir>/traffic.json
    {"schema_version": 1,
     "models": {"digits": {"students": [{"version": "1", "card": "/abs/student-v1.card.json"}],
                           "traffic": {"weights": {"1": 100}, "sticky_header": "...",
                                       "shadow_fraction": 0.1},
                           "previous_weights": null}}}

Only models changed through the admin API are in the file. For those, the file wins over the
config at start (it holds the operator's latest decision), and the start says so in the log;
deleting the file returns to the config. Writes are atomic: a temp file in the same directory,
fsync, `os.replace`, fsync of the directory, so a crash leaves the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdgate.service.settings import ModelSettings, Settings, StudentSettings, TrafficSettings

log = logging.getLogger(__name__)

FILE_NAME = "traffic.json"


class SavedModel(BaseModel):
    """One model as the admin API left it: its students, its split, the split before that."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    students: list[StudentSettings] = Field(min_length=1)
    traffic: TrafficSettings
    previous_weights: dict[str, int] | None = None


class SavedTraffic(BaseModel):
    """The whole state file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    models: dict[str, SavedModel] = Field(default_factory=dict)


class TrafficStore:
    """Reads and atomically writes `<state_dir>/traffic.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self.saved = SavedTraffic()

    def read(self) -> SavedTraffic:
        """The file's content (empty when there is no file yet); kept in `saved`."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return self.saved
        try:
            self.saved = SavedTraffic.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(
                f"{self.path} is not a kdgate traffic state file ({exc.error_count()} errors: "
                f"{exc.errors()[0]['msg']}); fix it or delete it to serve the config's traffic"
            ) from None
        return self.saved

    def write(self, saved: SavedTraffic) -> None:
        """Replace the file with `saved` (blocking: fsyncs; call it from a worker thread)."""
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        data = saved.model_dump_json(indent=2).encode() + b"\n"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{FILE_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename itself is only durable once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.saved = saved

    def restore(self, settings: Settings) -> Settings:
        """`settings` with each saved model's students and traffic in place of the config's."""
        saved = self.read()
        models: list[ModelSettings] = []
        for model in settings.models:
            entry = saved.models.get(model.name)
            if entry is None:
                models.append(model)
                continue
            try:
                models.append(
                    ModelSettings.model_validate(
                        {**model.model_dump(), "students": entry.students, "traffic": entry.traffic}
                    )
                )
            except ValidationError as exc:
                raise ValueError(
                    f"{self.path}: saved traffic of model {model.name!r} is invalid: {exc}"
                ) from None
            log.warning(
                "model %s: versions %s and traffic %s restored from %s (saved by the admin API; "
                "they override the config; delete the file to serve the config again)",
                model.name,
                [s.version for s in entry.students],
                entry.traffic.model_dump(),
                self.path,
            )
        unknown = sorted(set(saved.models) - {m.name for m in settings.models})
        if unknown:
            log.warning(
                "%s: saved traffic of unconfigured models %s is kept, not served",
                self.path,
                unknown,
            )
        return settings.model_copy(update={"models": models})
