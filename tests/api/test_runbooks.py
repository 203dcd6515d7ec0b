"""Every committed runbook link opens its runbook on a gateway: `GET /runbooks/{name}`.

The alerts' `runbook_url` (rule files, the Kubernetes PrometheusRule) and the dashboards' panel
links all point under DEFAULT_RUNBOOK_BASE, a gateway's own /runbooks on localhost:8000; here
each link is requested, as written, from a gateway in process (the client's transport is the app,
so the link's host reaches it as docker compose's port mapping would).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import yaml

from kdgate import RUNBOOKS_DIR
from kdgate.monitoring.rules import DEFAULT_RUNBOOK_BASE
from kdgate.service.app import KdgateApp, create_app
from kdgate.service.listeners import PortSplit
from kdgate.service.runbooks import Runbooks
from kdgate.service.settings import load_settings
from tests.support.asgi import running

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "runbooks"
MARKDOWN = "text/markdown; charset=utf-8"
TEXT_SUFFIXES = (".md", ".py", ".yml", ".yaml", ".json", ".toml")
SHIPPED = sorted(path.stem for path in DOCS.glob("*.md"))


@pytest.fixture
def app(config_file: Path) -> KdgateApp:
    return create_app(load_settings(config_file))


@pytest.fixture
async def gateway(app: KdgateApp) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as client:
        yield client


def _alert_links(rule_files: list[Path]) -> Iterator[str]:
    for path in rule_files:
        document = yaml.safe_load(path.read_text())
        groups = document["spec"]["groups"] if "spec" in document else document["groups"]
        for group in groups:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield rule["annotations"]["runbook_url"]


def _panel_links(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for link in node.get("links", []):
            if str(link.get("title", "")).startswith("Runbook"):
                yield link["url"]
        for value in node.values():
            yield from _panel_links(value)
    elif isinstance(node, list):
        for value in node:
            yield from _panel_links(value)


def committed_links() -> dict[str, list[str]]:
    """Every runbook link of every committed rules file, PrometheusRule and dashboard."""
    rule_files = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
    rule_files.append(ROOT / "deploy/kubernetes/base/prometheusrule.yaml")
    links = {path.name: list(_alert_links([path])) for path in rule_files}
    for path in sorted((ROOT / "dashboards/json").glob("*.json")):
        links[path.name] = list(_panel_links(json.loads(path.read_text())))
    return links


def test_the_committed_artefacts_carry_runbook_links() -> None:
    links = committed_links()
    assert all(links[name] for name in links if "executive" not in name), links
    every = {url for urls in links.values() for url in urls}
    assert {url.rsplit("/", 1)[1].removesuffix(".md") for url in every} == set(SHIPPED)


@pytest.mark.anyio
async def test_every_committed_runbook_link_opens_its_runbook(
    gateway: httpx.AsyncClient,
) -> None:
    for source, urls in committed_links().items():
        for url in urls:
            assert url.startswith(DEFAULT_RUNBOOK_BASE + "/"), (source, url)
            answer = await gateway.get(url)
            assert answer.status_code == 200, (source, url, answer.text)
            assert answer.headers["content-type"] == MARKDOWN
            assert answer.content == (DOCS / url.rsplit("/", 1)[1]).read_bytes(), (source, url)


def test_no_tracked_file_links_the_made_up_repository() -> None:
    # The project has no public repository: a link there would point nowhere.
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    here = Path(__file__).resolve()
    texts = [ROOT / n for n in tracked if n.endswith(TEXT_SUFFIXES) and ROOT / n != here]
    found = [p for p in texts if p.is_file() and "github.com/kdgate" in p.read_text("utf-8")]
    assert found == []


@pytest.mark.anyio
async def test_the_index_lists_every_shipped_runbook(gateway: httpx.AsyncClient) -> None:
    answer = await gateway.get("/runbooks")
    assert answer.status_code == 200
    index = answer.json()["runbooks"]
    assert [entry["name"] for entry in index] == SHIPPED
    for entry in index:
        assert entry["title"] == (DOCS / f"{entry['name']}.md").read_text().splitlines()[0][2:]
        page = await gateway.get(entry["url"])
        assert page.status_code == 200 and page.headers["content-type"] == MARKDOWN


@pytest.mark.anyio
async def test_a_name_without_md_is_the_same_runbook(gateway: httpx.AsyncClient) -> None:
    short, full = await gateway.get("/runbooks/latency"), await gateway.get("/runbooks/latency.md")
    assert short.status_code == full.status_code == 200
    assert short.content == full.content == (DOCS / "latency.md").read_bytes()
    assert full.headers["x-content-type-options"] == "nosniff"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path",
    [
        "/runbooks/nope.md",
        "/runbooks/nope",
        "/runbooks/LATENCY.md",
        "/runbooks/latency.txt",
        "/runbooks/README.md",
        "/runbooks/%2e%2e",
        "/runbooks/..%2FREADME.md",
        "/runbooks/..%2F..%2Fpyproject.toml",
        "/runbooks/%2e%2e%2fREADME.md",
        "/runbooks/latency.md/",
        "/runbooks/",
    ],
)
async def test_unknown_names_and_traversal_are_404(gateway: httpx.AsyncClient, path: str) -> None:
    answer = await gateway.get(path)
    assert answer.request.url.raw_path == path.encode()  # sent as written
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]


async def _raw_get(app: KdgateApp, raw_path: bytes) -> tuple[int, bytes]:
    """GET `raw_path` straight into the ASGI app, dot segments and all (httpx would remove
    them before sending, as browsers do; a hand-made request keeps them)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost:8000")],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


@pytest.mark.anyio
@pytest.mark.parametrize(
    "raw_path",
    [
        b"/runbooks/..",
        b"/runbooks/../README.md",
        b"/runbooks/../../pyproject.toml",
        b"/runbooks/./latency.md/..",
    ],
)
async def test_dot_segments_reach_nothing(
    app: KdgateApp, gateway: httpx.AsyncClient, raw_path: bytes
) -> None:
    status, body = await _raw_get(app, raw_path)
    assert status == 404
    assert json.loads(body)["error"]


def test_runbooks_are_read_from_the_package_which_links_the_docs() -> None:
    assert RUNBOOKS_DIR.resolve() == DOCS.resolve()
    pyproject = (ROOT / "pyproject.toml").read_text()
    (package_data,) = re.findall(r"^kdgate = \[(.*)\]$", pyproject, flags=re.MULTILINE)
    assert '"runbooks/*.md"' in package_data, "the wheel must ship the runbooks"
    books = Runbooks.load()
    assert [entry["name"] for entry in books.index("/runbooks")] == SHIPPED


def test_a_missing_runbook_directory_serves_none(tmp_path: Path) -> None:
    books = Runbooks.load(tmp_path / "absent")
    assert books.index("/runbooks") == [] and books.get("latency") is None


def test_runbooks_are_on_the_main_port_when_admin_has_its_own() -> None:
    split = PortSplit(admin_port=9000)
    scope = {"path": "/runbooks/latency.md", "server": ("127.0.0.1", 8000)}
    assert split.misplaced(scope) is None
    assert split.misplaced({**scope, "server": ("127.0.0.1", 9000)}) is not None
