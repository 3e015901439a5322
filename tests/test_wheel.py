"""The wheel a researcher installs: built from a clean copy of the repository, installed into a fresh
venv, run from a folder that has its own `worker/` and `backend/` packages.

Real pip, real npm (the build step makes the dashboard), real `deltalens up`, a real analysis.
About two minutes: most of it is pip installing the dependencies into the fresh venv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from service import ROOT, free_port, wait_done, wait_for

SHADOW = "raise SystemExit('imported the current folder instead of the installed deltalens')\n"


def clean_copy(dest: Path) -> Path:
    """What a clean clone holds: tracked files and untracked ones git does not ignore (no build outputs)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = clean_copy(tmp_path_factory.mktemp("clone"))
    assert not (src / "backend" / "dashboard").exists()
    out = src / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), "."],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("deltalens-*.whl")
    return built


def test_the_wheel_holds_one_package_and_the_dashboard(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"deltalens", "deltalens-0.1.0.dist-info"}
    assert "deltalens/backend/dashboard/index.html" in names
    assert any(n.startswith("deltalens/backend/dashboard/assets/") and n.endswith(".js") for n in names)
    for kernel in ("_fastpair", "_fastmask"):
        assert any(n.startswith(f"deltalens/worker/{kernel}") for n in names), kernel


def test_installed_wheel_serves_and_analyses_from_a_shadowing_folder(wheel, tmp_path, family_pair):
    """`make reliability` (DELTALENS_WHEEL_DEPS=1) installs the wheel's declared dependencies into the
    fresh venv (~2 min of pip); `make test` installs the wheel alone and lends it the test venv's
    packages through a .pth file — the package, its data and its entry point are the wheel's either way."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    full = os.environ.get("DELTALENS_WHEEL_DEPS") == "1"
    if not full:
        (site,) = (venv / "lib").glob("python*/site-packages")
        lent = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
        (site / "lent-test-packages.pth").write_text("\n".join(lent) + "\n")
    subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "-c", ROOT / "constraints.txt", wheel]
        + ([] if full else ["--no-deps"]),
        check=True,
        capture_output=True,
    )
    project = tmp_path / "my-project"  # a researcher's folder with packages of the same names
    for name in ("worker", "backend", "deltalens"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(SHADOW)
    base, target = family_pair("llama")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTALENS_", "PYTHON"))}
    env.update(DELTALENS_ALLOWED_ROOTS=str(base.parent), DELTALENS_DEVICE="cpu")
    proc = subprocess.Popen(
        [venv / "bin" / "deltalens", "up", "--port", str(port), "--data-dir", "data"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_for(lambda: httpx.get(url + "/api/health", timeout=2).json(), 90, what="deltalens up")
        assert health["dashboard"] is True
        page = httpx.get(url + "/analyses/x")
        assert page.status_code == 200 and 'id="app"' in page.text
        with httpx.Client(base_url=url, timeout=30) as client:
            ids = [
                client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)
            ]
            aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
            status = wait_done(client, aid, 180)
            assert status["status"] == "done", status
            assert client.get(f"/api/analyses/{aid}/result").json()["summary"]["numel"] > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        log = proc.communicate(timeout=30)[0]
    assert "imported the current folder" not in log, log


def test_without_a_built_dashboard_the_page_says_how_to_build_it(monkeypatch):
    from fastapi.testclient import TestClient

    from deltalens.backend import app as app_module

    monkeypatch.setattr(app_module, "dashboard_folder", lambda: None)
    client = TestClient(app_module.create_app())  # no lifespan: only the static routes are asked
    page = client.get("/analyses/x")
    assert page.status_code == 503 and app_module.BUILD_COMMAND in page.text
    assert client.get("/api/health").json() == {"status": "ok", "dashboard": False}
