"""The dashboards type-check against Grafana's published Dashboard type (npm @grafana/schema).

Each dashboard's JSON becomes the literal of a `satisfies Dashboard` expression, so `tsc` checks
required fields, value types and unknown keys (excess-property checks). Enums are compared by
value, as JSON carries them. The npm tools are installed by
`npm ci --prefix dashboards/typecheck` (pinned in its package-lock.json).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.dashboards import DASHBOARDS_DIR

pytestmark = pytest.mark.system

TOOLS = DASHBOARDS_DIR.parent / "typecheck"
TSC = TOOLS / "node_modules" / ".bin" / "tsc"
SCHEMA = TOOLS / "node_modules" / "@grafana" / "schema" / "dist" / "types" / "index.d.ts"

PRELUDE = """import type { Dashboard } from '@grafana/schema';
// JSON holds an enum's value, never the enum: check against the values.
type Json<T> = T extends string ? `${T}`
  : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<Json<U>>
  : { [K in keyof T]: Json<T[K]> };
"""


def typecheck(sources: dict[str, str], workdir: Path) -> subprocess.CompletedProcess[str]:
    """Writes one .ts file per dashboard JSON text and runs tsc over them."""
    if not TSC.exists() or not SCHEMA.exists():
        pytest.skip("npm tools missing: npm ci --prefix dashboards/typecheck")
    for name, text in sources.items():
        body = f"{PRELUDE}export const dashboard = (\n{text}\n) satisfies Json<Dashboard>;\n"
        (workdir / f"{name}.ts").write_text(body, encoding="utf-8")
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "skipLibCheck": True,
            "target": "es2022",
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "types": [],
            "paths": {"@grafana/schema": [str(SCHEMA)]},
        },
        "files": [f"{name}.ts" for name in sources],
    }
    (workdir / "tsconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return subprocess.run(
        [str(TSC), "-p", str(workdir / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dashboards_satisfy_grafana_dashboard_type(tmp_path: Path) -> None:
    sources = {p.stem: p.read_text(encoding="utf-8") for p in DASHBOARDS_DIR.glob("*.json")}
    assert len(sources) == 3
    done = typecheck(sources, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_typecheck_rejects_a_wrong_type_and_an_unknown_key(tmp_path: Path) -> None:
    board = json.loads((DASHBOARDS_DIR / "kdgate-oncall.json").read_text(encoding="utf-8"))
    board["schemaVersion"] = str(board["schemaVersion"])
    board["templating"]["list"][1]["defintion"] = "typo"
    done = typecheck({"broken": json.dumps(board)}, tmp_path)
    assert done.returncode != 0
    assert "schemaVersion" in done.stdout or "'string' is not assignable" in done.stdout
    assert "defintion" in done.stdout
