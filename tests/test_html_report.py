"""`deltalens report` (worker/html_report.py): one self-contained HTML file that draws in Chromium
with no network; and `deltalens up --import` (backend/imports.py): CLI results served by the API and
drawn by the dashboard like any other analysis, a bad file refused with nothing touched."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
from conftest import run_cli
from service import ROOT, free_port, wait_done, wait_for
from test_notebook import notebook_runs

import deltalens as dl
from deltalens.worker.notebook import load

playwright = pytest.importorskip("playwright.sync_api")
from test_dashboard import ARGS, CHROMIUM, DRAWN, SHOTS  # noqa: E402  (Debian's Chromium, as the dashboard tests)

REPORT_DRAWN = (
    "() => [...document.querySelectorAll('.plotly-graph-div')].every((p) => p.querySelector('.main-svg'))"
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, family_pair, llama_series):
    """One DuckDB file holding a pair (two τ, rank and geometry), a series and an overlap."""
    return notebook_runs(tmp_path_factory, family_pair, llama_series)["artifact"]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def new_page(browser, **kw):
    """A fresh context's page; page errors, console errors and every request it makes are kept."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, **kw)
    page = context.new_page()
    page.errors, page.requests = [], []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: page.requests.append(r.url))
    return context, page


def test_report_is_one_file_that_draws_offline(artifact, browser, tmp_path):
    report = tmp_path / "report.html"
    proc = run_cli("report", artifact, "-o", report, "--title", "runs <of> May", check=True)
    assert proc.stdout.strip() == f"report of 3 analyses: {report}"
    text = report.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text) and not re.search(r"<link[^>]*\bhref=", text)
    assert "<title>runs &lt;of&gt; May</title>" in text  # names are data
    analyses = load(artifact)
    figures = sum(len(a.figures()) for a in analyses)
    assert text.count('class="plotly-graph-div"') == figures
    assert text.count("<tr>") == sum(len(a.tensors) + 1 for a in analyses)  # every matrix, + headers

    context, page = new_page(browser, offline=True)
    page.goto(report.as_uri())
    page.wait_for_function(REPORT_DRAWN, timeout=30_000)
    assert page.errors == [] and [u for u in page.requests if not u.startswith("file:")] == []
    assert page.locator(".plotly-graph-div .main-svg").count() >= figures
    pair = analyses[0]
    drawn = page.evaluate("document.getElementById('fig-0-0').data[0].z")
    assert drawn == [list(row) for row in pair.heatmap("sparsity", 1e-5).data[0].z]
    assert page.locator("h2").all_inner_texts()[0].startswith("pair: ")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    context.close()

    assert run_cli("report", artifact, "--id", "000000000000", "-o", tmp_path / "x.html").returncode == 2
    (tmp_path / "notes.duckdb").write_text("hello")
    proc = run_cli("report", tmp_path / "notes.duckdb", "-o", tmp_path / "x.html")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("notes.duckdb: not a DuckDB file")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.html").exists()


def up(data, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deltalens.worker.cli", "up", "--data-dir", str(data), *map(str, args)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_up_import_serves_cli_results_and_refuses_a_bad_file(artifact, browser, family_pair, tmp_path):
    data, port = tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTALENS_")}
    env.update(DELTALENS_DEVICE="cpu", DELTALENS_ALLOWED_ROOTS=str(family_pair("llama")[0].parent))
    proc = up(data, "--import", artifact, "--port", port, env=env)
    stored = {a.id: a for a in load(artifact)}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/api/health", timeout=2).json(), 90, what="deltalens up --import")
        with httpx.Client(base_url=url, timeout=30) as client:
            listed = {a["id"]: a for a in client.get("/api/analyses").json()}
            assert set(listed) == set(stored)
            for aid, a in stored.items():
                assert listed[aid]["status"] == "done" and listed[aid]["kind"] == a.kind
                assert listed[aid]["checkpoints"] == [a.base, *a.targets]
                assert listed[aid]["detail"] == {"imported": str(artifact)}
                assert client.get(f"/api/analyses/{aid}/result").json() == a.document
            pair = next(a for a in stored.values() if a.kind == "pair")
            # a service artifact (results/<id>.duckdb) opens in the notebook with the API's numbers
            served = dl.open(data / "results" / f"{pair.id}.duckdb")
            heat = client.get(f"/api/analyses/{pair.id}/heatmap", params={"metric": "rank_pct"}).json()
            assert [list(r) for r in served.heatmap("rank_pct").data[0].z] == heat["values"]
            ids = [
                client.post("/api/checkpoints", json={"path": str(p)}).json()["id"]
                for p in family_pair("llama")
            ]
            body = {"kind": "pair", "checkpoints": ids, "taus": [1e-3], "rank": False, "geometry": False}
            fresh = client.post("/api/analyses", json=body).json()["id"]  # a worker's own artifact, too

            context, page = new_page(browser)
            page.goto(f"{url}/analyses/{pair.id}")
            page.locator("#heatmap .nsewdrag").wait_for(timeout=30_000)
            page.wait_for_function(DRAWN)
            assert page.errors == []
            page.screenshot(path=str(SHOTS / "imported-analysis.png"), full_page=True)
            page.click("#theme")
            page.wait_for_function(DRAWN)
            page.screenshot(path=str(SHOTS / "imported-analysis-dark.png"), full_page=True)
            context.close()

            assert wait_done(client, fresh, 180)["status"] == "done"
            worker = dl.open(data / "results" / f"{fresh}.duckdb")
            assert worker.document == client.get(f"/api/analyses/{fresh}/result").json()
            assert worker.tensors["changed@0.001"].tolist() == pair.tensors["changed@0.001"].tolist()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert out.count(" imported: ") == len(stored)

    catalog = (data / "catalog.duckdb").read_bytes()
    results = sorted(p.name for p in (data / "results").iterdir())
    bad = tmp_path / "bad.duckdb"
    for content, problem in ((b"SQLite format 3\0", "not a DuckDB file"), (None, "a deltalens catalog")):
        if content is None:
            bad = data / "catalog.duckdb"
        else:
            bad.write_bytes(content)
        proc = up(data, "--import", bad, "--port", free_port(), env=env)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and err.startswith(f"deltalens: error: {bad}: {problem}")
        assert len(err.strip().splitlines()) == 1
    assert (data / "catalog.duckdb").read_bytes() == catalog
    assert sorted(p.name for p in (data / "results").iterdir()) == results
