"""The analyses list and the New page against one running stack in hosted mode (a token): titles given
at creation, renamed and deleted (API and page), a headline figure per kind, failures that name their
checkpoints and reason, titles shown as text; uploads named by default, duplicate names and files that
are not safetensors refused before a byte is sent, base and target ordered with buttons."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import struct

import duckdb
import httpx
import pytest
from service import Api, Worker, running, service_env, wait_done
from test_dashboard import DIST, browser, new_page, shot  # noqa: F401  (browser: a fixture)

from deltalens.backend.catalog import Catalog
from deltalens.worker.contract import DEFAULT_TAU, nearest_edge_index

playwright = pytest.importorskip("playwright.sync_api")
TOKEN = "browse-" + secrets.token_hex(8)
XSS = "<img src=x onerror=alert(1)>"
QUICK = {"taus": [DEFAULT_TAU], "rank": False, "geometry": False}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, family_pair, llama_series):
    """The API (hosted: writes need the token; pickles allowed) and a worker; the client sends the token."""
    assert DIST.exists(), "build the dashboard first: make test runs `npm run build` in frontend/"
    root = tmp_path_factory.mktemp("browse")
    (root / "results").mkdir()
    (root / "models").mkdir()
    roots = [family_pair("llama")[0].parent, llama_series[0].parent, root / "models"]
    env = service_env(
        root / "data",
        "filesystem://",
        f"file://{root / 'results'}",
        "browse",
        roots,
        DELTALENS_TOKEN=TOKEN,
        DELTALENS_ALLOW_PICKLE="1",  # the New page offers .bin files
    )
    with running(Worker(env, root / "worker.log"), Api(env, root / "api.log")) as (_, api):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=api.url, timeout=30, headers=headers) as client:
            client.models = root / "models"
            yield client


def register(client: httpx.Client, path) -> str:
    r = client.post("/api/checkpoints", json={"path": str(path)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def analyse(client: httpx.Client, kind: str, ids: list[str], **extra) -> str:
    r = client.post("/api/analyses", json={"kind": kind, "checkpoints": ids, **QUICK, **extra})
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def analyses(stack, family_pair, llama_series):
    """One done analysis of each kind, and a failed one (its checkpoint rewritten after registration)."""
    base, target = family_pair("llama")
    base_id = register(stack, base)
    pair = analyse(stack, "pair", [base_id, register(stack, target)], title="SFT stage")
    steps = [register(stack, p) for p in llama_series[:3]]  # base and two: the cheapest of each kind
    series = analyse(stack, "series", steps)
    overlap = analyse(stack, "overlap", steps)
    changed = shutil.copytree(target, stack.models / "changed")
    broken = register(stack, changed)
    weights = next(changed.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    failed = analyse(stack, "pair", [base_id, broken], title="will fail")
    done = {aid: wait_done(stack, aid) for aid in (pair, series, overlap, failed)}
    assert [done[a]["status"] for a in (pair, series, overlap)] == ["done"] * 3, done
    assert done[failed]["status"] == "failed"
    return {"pair": pair, "series": series, "overlap": overlap, "failed": failed, "done": done}


def test_titles_and_headlines_through_the_api(stack, analyses):
    listed = {a["id"]: a for a in stack.get("/api/analyses").json()}
    pair, series, overlap = (listed[analyses[k]] for k in ("pair", "series", "overlap"))
    assert pair["title"] == "SFT stage"
    names = [c["name"] for c in stack.get("/api/checkpoints").json()][2:5]  # after the pair's two
    assert series["title"] == f"{names[0]} → {names[-1]} (2 checkpoints)"  # the default, from the names
    assert overlap["title"] == f"{', '.join(names[1:])} from {names[0]}"
    # each headline is the figure its own view shows
    curve = stack.get(f"/api/analyses/{analyses['pair']}/sparsity-curve").json()
    edge = nearest_edge_index(DEFAULT_TAU)
    assert pair["headline"]["metric"] == "sparsity" and pair["headline"]["tau"] == curve["tau"][edge]
    assert pair["headline"]["value"] == pytest.approx(curve["sparsity"][edge], rel=1e-12)
    view = stack.get(f"/api/analyses/{analyses['series']}/series").json()
    assert series["headline"]["value"] == pytest.approx(view["categories"]["transient"] / view["numel"])
    assert 0 < series["headline"]["value"] < 1
    first = stack.get(f"/api/analyses/{analyses['overlap']}/overlap").json()["summary"]["pairs"][0]
    assert overlap["headline"]["metric"] == "overlap_o1"
    assert (overlap["headline"]["value"], overlap["headline"]["baseline"]) == (
        first["o1"],
        first["baseline1"],
    )
    assert listed[analyses["failed"]]["headline"] is None


def test_rename_is_token_protected_bounded_and_plain_text(stack, analyses):
    url = f"/api/analyses/{analyses['pair']}"
    r = httpx.patch(str(stack.base_url) + url, json={"title": "x"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    r = httpx.patch(str(stack.base_url) + url, json={"title": "x"}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401
    for bad in ("x" * 201, "   ", "two\nlines", "two\u2028lines", "rtl\u202eoverride", "c1\x85next", None):
        r = stack.patch(url, json={"title": bad})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", (bad, r.text)
    r = stack.post("/api/analyses", json={"kind": "pair", "checkpoints": ["a", "b"], "title": "y" * 201})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"
    assert stack.patch("/api/analyses/0123456789ab", json={"title": "x"}).status_code == 404
    assert stack.get(url).json()["title"] == "SFT stage"  # nothing changed by the refusals
    r = stack.patch(url, json={"title": "  " + "z" * 200 + "  "})
    assert r.status_code == 200 and r.json()["title"] == "z" * 200 and r.json()["headline"]
    assert stack.patch(url, json={"title": "SFT stage"}).json()["title"] == "SFT stage"
    assert stack.get(f"{url}/summary").status_code == 200  # the results are untouched


def test_catalogs_from_before_titles_get_default_titles(tmp_path):
    path = tmp_path / "catalog.duckdb"
    with duckdb.connect(str(path)) as old:  # the jobs table as it was before titles
        old.execute(
            "CREATE TABLE jobs (id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, status VARCHAR NOT NULL, "
            "checkpoints VARCHAR[] NOT NULL, taus DOUBLE[] NOT NULL, relative BOOLEAN NOT NULL, "
            "rank BOOLEAN NOT NULL, created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL, "
            "progress DOUBLE NOT NULL DEFAULT 0, detail JSON, error_code VARCHAR, error_message VARCHAR)"
        )
        old.execute(
            "INSERT INTO jobs VALUES "
            "('a1', 'pair', 'done', ['b', 't'], [1e-5], false, true, now(), now(), 1, NULL, NULL, NULL)"
        )
    catalog = Catalog(path)
    try:
        assert catalog.job("a1")["title"] == "t vs b"
        assert catalog.rename_job("a1", "kept") and not catalog.rename_job("zz", "x")
    finally:
        catalog.close()
    catalog = Catalog(path)
    assert catalog.job("a1")["title"] == "kept"
    catalog.close()


def page_with_token(browser, dark: bool):  # noqa: F811
    context, page = new_page(browser, color_scheme="dark" if dark else "light")
    theme = "dark" if dark else "light"
    context.add_init_script(
        f"localStorage.setItem('deltalens-token', '{TOKEN}');"
        f"localStorage.setItem('deltalens-theme', '{theme}')"
    )
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    return context, page


def test_list_shows_titles_figures_failures_renames_and_deletes(stack, analyses, browser):  # noqa: F811
    site = str(stack.base_url)
    done = analyses["done"]
    context, page = page_with_token(browser, dark=False)
    page.goto(site + "/")
    row = page.locator(f"tr[data-analysis='{analyses['pair']}']")
    row.wait_for()
    assert row.locator("a.title").inner_text() == "SFT stage"
    headline = stack.get(f"/api/analyses/{analyses['pair']}").json()["headline"]
    assert row.locator("td.headline").inner_text() == f"sparsity {100 * headline['value']:.1f}%"
    assert (
        page.locator(f"tr[data-analysis='{analyses['series']}'] td.headline")
        .inner_text()
        .startswith("transient ")
    )
    assert re.fullmatch(
        r"o1 [\d.]+% vs random [\d.]+%",
        page.locator(f"tr[data-analysis='{analyses['overlap']}'] td.headline").inner_text(),
    )
    # a failed analysis names its checkpoints and why
    failed = page.locator(f"tr[data-analysis='{analyses['failed']}']")
    assert failed.locator("td.checkpoints").inner_text() == "base → changed"
    reason = failed.locator(".failure").inner_text()
    assert "changed since it was registered" in reason and "safetensors" in reason, reason
    shot(page, "browse-list-light")

    # rename in the page to markup: it is shown as text, never run
    row.get_by_role("button", name="rename SFT stage").click()
    page.get_by_label("new title of SFT stage").fill(XSS)
    page.get_by_label("new title of SFT stage").press("Enter")
    page.locator("a.title", has_text=XSS).wait_for()
    assert stack.get(f"/api/analyses/{analyses['pair']}").json()["title"] == XSS
    assert page.locator("table.analyses img").count() == 0 and not page.dialogs
    # a refused rename says why and changes nothing
    row.get_by_role("button", name=f"rename {XSS}").click()
    page.get_by_label(f"new title of {XSS}").fill("  ")
    page.get_by_role("button", name="Save").click()
    page.locator("#browse-message [role=alert]").wait_for()
    assert "title" in page.locator("#browse-message").inner_text()
    page.get_by_role("button", name="Cancel").click()
    assert row.locator("a.title").inner_text() == XSS

    # delete takes two clicks, then the analysis is gone
    victim = analyse(stack, "pair", done[analyses["pair"]]["checkpoints"], title="to delete")
    page.reload()
    gone = page.locator(f"tr[data-analysis='{victim}']")
    gone.get_by_role("button", name="delete to delete").click()
    assert gone.get_by_role("button", name="delete to delete").inner_text() == "Confirm delete"
    page.wait_for_timeout(1200)  # the list redraws while the analysis runs: the button stays armed
    gone.get_by_role("button", name="delete to delete").click()
    gone.wait_for(state="detached")
    assert stack.get(f"/api/analyses/{victim}").status_code == 404
    assert not page.errors and not page.dialogs, (page.errors, page.dialogs)
    context.close()

    context, page = page_with_token(browser, dark=True)
    page.goto(site + "/")
    page.locator(f"tr[data-analysis='{analyses['failed']}']").wait_for()
    shot(page, "browse-list-dark")
    context.close()
    stack.patch(f"/api/analyses/{analyses['pair']}", json={"title": "SFT stage"})


def safetensors_like(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return path


def test_new_page_names_refuses_and_orders(stack, analyses, browser, family_pair, tmp_path):  # noqa: F811
    site = str(stack.base_url)
    weights = next(family_pair("llama")[1].glob("*.safetensors"))
    tiny = shutil.copy(weights, tmp_path / "tiny.safetensors")
    config = stack.get("/api/config").json()
    assert (config["allow_pickle"], config["max_title"]) == (True, 200)
    context, page = page_with_token(browser, dark=False)
    page.goto(site + "/new")
    assert ".bin" in page.locator(".dropzone").inner_text()  # this server takes pickles
    # the name defaults to the file's stem
    page.set_input_files("#file-input", [str(tiny)])
    page.get_by_text("Uploaded and validated: tiny").wait_for(timeout=30_000)
    # the same name again: refused before upload; another name, then Upload
    page.set_input_files("#file-input", [str(tiny)])
    page.locator("#new-message [role=alert]", has_text="“tiny” exists already").wait_for()
    assert page.input_value("#upload-name") == "tiny" and page.locator("#upload-start").is_visible()
    page.fill("#upload-name", "tiny-2")
    page.click("#upload-start")
    page.get_by_text("Uploaded and validated: tiny-2").wait_for(timeout=30_000)
    names = [c["name"] for c in stack.get("/api/checkpoints").json()]
    assert names.count("tiny") == 1 and "tiny-2" in names
    # not a safetensors file: said here, nothing sent
    sessions = len(list((stack.models.parent / "data" / "uploads").iterdir()))
    page.set_input_files("#file-input", [str(safetensors_like(tmp_path / "junk.safetensors", b"<html>hi"))])
    page.locator("#new-message [role=alert]", has_text="junk.safetensors: not a safetensors file").wait_for()
    assert len(list((stack.models.parent / "data" / "uploads").iterdir())) == sessions
    # a JSON header the server refuses: its message is shown
    page.set_input_files("#file-input", [str(safetensors_like(tmp_path / "odd.safetensors", b'{"w": 1}'))])
    page.locator("#new-message [role=alert]", has_text="Upload refused: odd.safetensors").wait_for()
    # a .bin is taken, named, sent, and judged by the server (in a child process: not a pickle)
    (tmp_path / "trained.bin").write_bytes(b"not really a pickle")
    page.set_input_files("#file-input", [str(tmp_path / "trained.bin")])
    page.locator("#new-message [role=alert]", has_text="Upload refused: trained.bin").wait_for(timeout=60_000)
    assert page.input_value("#upload-name") == "trained"

    # both uploads are chosen in upload order; the buttons swap base and target
    order = page.locator("#order li")
    assert order.evaluate_all("(items) => items.map((i) => i.dataset.role)") == ["base", "target"]
    assert order.locator(".name").all_inner_texts() == ["tiny", "tiny-2"]
    page.get_by_role("button", name="move tiny-2 up").click()
    assert order.locator(".name").all_inner_texts() == ["tiny-2", "tiny"]
    # by keyboard: focus stays on the moved item (its other button once at the bottom)
    page.get_by_role("button", name="move tiny-2 down").focus()
    page.keyboard.press("Enter")
    assert order.locator(".name").all_inner_texts() == ["tiny", "tiny-2"]
    page.keyboard.press("Enter")
    assert order.locator(".name").all_inner_texts() == ["tiny-2", "tiny"]
    page.fill("#analysis-title", "ordered by buttons")
    shot(page, "new-page-light")
    page.click("#submit")
    page.locator("#follow-status").wait_for()
    ids = {c["name"]: c["id"] for c in stack.get("/api/checkpoints").json()}
    made = next(a for a in stack.get("/api/analyses").json() if a["title"] == "ordered by buttons")
    assert made["checkpoints"] == [ids["tiny-2"], ids["tiny"]]
    assert stack.delete(f"/api/analyses/{made['id']}").status_code == 204  # stops it: a quick teardown
    assert not page.errors, page.errors
    context.close()

    context, page = page_with_token(browser, dark=True)
    page.goto(site + "/new")
    page.get_by_role("button", name=re.compile(r"^tiny · ")).click()
    page.get_by_role("button", name=re.compile(r"^tiny-2 · ")).click()
    page.locator("#order li").nth(1).wait_for()
    shot(page, "new-page-dark")
    context.close()
