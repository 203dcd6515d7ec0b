"""The README points only at files of this repository (a link outside it rots unseen)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"`((?:\.\./|docs/|deploy/|models/|bench/|stack/)[^`\s]*)`")


def test_every_link_and_named_path_is_inside_the_repository() -> None:
    text = (REPO / "README.md").read_text()
    targets = LINK.findall(text) + PATH.findall(text)
    assert targets
    for target in targets:
        assert "://" not in target, f"README links outside the repository: {target}"
        path = (REPO / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"README points outside the repository: {target}"
        assert path.exists(), f"README names a missing file: {target}"
