"""The README's curl examples run against a real server, so they cannot rot.

Convention: a fenced block is executed when the line right before its opening fence is
`<!-- readme-example -->` (invisible on GitHub) and the fence is ```bash. Each block runs in
`bash -euo pipefail` with `curl` failing on any HTTP error (`--fail-with-body`), after
`127.0.0.1:8000` / `localhost:8000` are replaced by the test server's address.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.live_server import REPO, LiveServer

pytestmark = pytest.mark.integration

MARKER = "<!-- readme-example -->"
_BLOCK = re.compile(
    r"^" + re.escape(MARKER) + r"[ \t]*\n```bash[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL
)
_ADDRESS = re.compile(r"(?:127\.0\.0\.1|localhost):8000")
_STRICT_CURL = 'curl() { command curl --fail-with-body --silent --show-error "$@"; }\n'


def readme_examples(text: str) -> list[str]:
    """The marked ```bash blocks of a README, in order."""
    return [match.group(1) for match in _BLOCK.finditer(text)]


def test_marker_convention_is_parsed() -> None:
    text = f"x\n{MARKER}\n```bash\ncurl -s localhost:8000/v2\n```\n```bash\nrm -rf /\n```\n"
    assert readme_examples(text) == ["curl -s localhost:8000/v2\n"]


def run_examples(blocks: list[str], server: LiveServer) -> None:
    for block in blocks:
        script = _STRICT_CURL + _ADDRESS.sub(f"127.0.0.1:{server.port}", block)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(REPO),
        )
        assert result.returncode == 0, f"{block}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def test_runner_fails_on_an_http_error(server: LiveServer) -> None:
    good = "curl -s http://127.0.0.1:8000/v2/health/ready\n"
    run_examples([good], server)
    with pytest.raises(AssertionError):
        run_examples(["curl -s http://127.0.0.1:8000/v2/models/cats\n"], server)


def test_readme_curl_examples_work(server: LiveServer) -> None:
    blocks = readme_examples((REPO / "README.md").read_text())
    assert blocks, f"README.md has no {MARKER} ```bash blocks to run"
    assert any("curl" in block for block in blocks)
    run_examples(blocks, server)
