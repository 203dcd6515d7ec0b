"""The alerts' runbooks, served by the gateway itself: `GET /runbooks` and `/runbooks/{name}`.

Every alert's `runbook_url` and every dashboard panel link is `<base>/<name>.md`, and the default
base is a gateway's own `/runbooks` (monitoring/rules.py, DEFAULT_RUNBOOK_BASE), so the links open
wherever a kdgate runs, with no wiki or public repository. The runbooks are the `*.md` files of
`kdgate/runbooks` (package data; docs/runbooks in the repository), read once when the app is
built. A request names one of them, never a path: any other name is 404 before the filesystem is
consulted, so `..` and encoded slashes reach nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kdgate import RUNBOOKS_DIR

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/markdown; charset=utf-8"
SUFFIX = ".md"


@dataclass(frozen=True)
class Runbook:
    """One runbook: `name` is its file stem ("latency"), `title` its first line without `# `."""

    name: str
    title: str
    text: bytes  # UTF-8 markdown, as shipped


class Runbooks:
    """The shipped set of runbooks by name; `get` accepts "latency" and "latency.md"."""

    def __init__(self, books: Mapping[str, Runbook]) -> None:
        self._books = dict(sorted(books.items()))

    @classmethod
    def load(cls, directory: Path = RUNBOOKS_DIR) -> Runbooks:
        """Every `*.md` in `directory` (a few KiB each). A missing directory (an install without
        package data) gives an empty set and a warning: the links 404, serving goes on."""
        if not directory.is_dir():
            log.warning("no runbooks at %s: GET /runbooks/{name} answers 404", directory)
            return cls({})
        books = {}
        for path in directory.glob(f"*{SUFFIX}"):
            text = path.read_bytes()
            first = text.decode("utf-8").partition("\n")[0]
            books[path.stem] = Runbook(path.stem, first.lstrip("#").strip(), text)
        return cls(books)

    def get(self, name: str) -> Runbook | None:
        """The runbook called `name` (with or without `.md`), or None when none is."""
        return self._books.get(name.removesuffix(SUFFIX))

    def index(self, prefix: str) -> list[dict[str, str]]:
        """Name, title and URL path (under `prefix`, e.g. "/runbooks") of each, by name."""
        return [
            {"name": book.name, "title": book.title, "url": f"{prefix}/{book.name}{SUFFIX}"}
            for book in self._books.values()
        ]
