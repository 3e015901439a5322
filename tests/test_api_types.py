"""The dashboard's API types (frontend/src/api-schema.ts) are generated from the backend's OpenAPI
document by openapi-typescript; a backend change that alters the schema must regenerate them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from service import ROOT

from deltalens.backend.app import create_app

FRONTEND = ROOT / "frontend"
GENERATOR = FRONTEND / "node_modules" / ".bin" / "openapi-typescript"
COMMITTED = FRONTEND / "src" / "api-schema.ts"
REGENERATE = "cd frontend && npm run api-types:sync"


def test_committed_api_types_match_the_backend_schema(tmp_path):
    if not GENERATOR.exists() or shutil.which("node") is None:
        pytest.skip("openapi-typescript is not installed: run `npm ci` in frontend/")
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(create_app().openapi(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    # the flags of the `api-types` script in frontend/package.json, so both produce the same file
    script = json.loads((FRONTEND / "package.json").read_text())["scripts"]["api-types"].split()
    assert script[0] == "openapi-typescript", script
    generated = tmp_path / "api-schema.ts"
    flags = script[1:]
    at = flags.index("--output")
    del flags[at : at + 2]
    subprocess.run(
        [str(GENERATOR), str(schema), *flags, "--output", str(generated)],
        cwd=FRONTEND,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert generated.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8"), (
        f"frontend/src/api-schema.ts is out of date with the backend's OpenAPI schema; "
        f"regenerate it with `{REGENERATE}` and commit the result"
    )
