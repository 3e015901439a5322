"""The pair overview and the matrix view in a real browser (Chromium via Playwright) against a running
stack: the tensor table (every matrix, sort, filter, keyboard, CSV as shown), fixed and titled colour
scales, PNG export of a chart, the matrix view's count at the page's τ and its layer neighbours.
Screenshots (light and dark) go to test-output/screenshots/."""

from __future__ import annotations

import csv
import io
import re

import httpx
import pytest
from service import Api, Worker, running, service_env, wait_done
from test_dashboard import ARGS, CHROMIUM, DIST, new_page, shot

from deltalens.worker.contract import BIN_EDGES, changed_from_histogram, nearest_edge_index

playwright = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, family_pair):
    """(API URL, client, id of a done llama pair analysis at τ = 1e-5)."""
    assert DIST.exists(), "build the dashboard first: make test runs `npm run build` in frontend/"
    base, target = family_pair("llama")
    root = tmp_path_factory.mktemp("views")
    (root / "results").mkdir()
    env = service_env(root / "data", "filesystem://", f"file://{root / 'results'}", "views", [base.parent])
    with running(Worker(env, root / "worker.log"), Api(env, root / "api.log")) as (_, api):
        client = httpx.Client(base_url=api.url, timeout=30)
        ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)]
        body = {"kind": "pair", "checkpoints": ids, "taus": [1e-5]}
        created = client.post("/api/analyses", json=body)
        assert created.status_code == 202, created.text
        aid = created.json()["id"]
        assert wait_done(client, aid)["status"] == "done"
        yield api.url, client, aid


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def column(page, key: str) -> list[str]:
    """The texts of one column of the tensor table, in the order shown."""
    index = page.locator("#matrix-table thead th").evaluate_all(
        f"(ths) => ths.findIndex((th) => th.dataset.key === '{key}')"
    )
    return page.locator("#matrix-table tbody tr[data-index]").evaluate_all(
        f"(trs) => trs.map((tr) => tr.children[{index}].textContent)"
    )


def percents(texts: list[str]) -> list[float]:
    return [float(t.rstrip("%")) for t in texts if t != "–"]


def test_tensor_table_scales_and_exports(pair, browser):
    url, client, aid = pair
    tensors = client.get(f"/api/analyses/{aid}/tensors").json()
    context, page = new_page(browser)
    page.goto(f"{url}/analyses/{aid}")
    rows = page.locator("#matrix-table tbody tr[data-index]")
    rows.first.wait_for()
    # every matrix of the artifact, with its exact count at the requested τ
    assert sorted(column(page, "name")) == sorted(t["name"] for t in tensors)
    first = next(t for t in tensors if t["name"] == column(page, "name")[0])
    assert rows.first.locator("td").nth(3).inner_text() == f"{first['changed'][0]['count']:,}"

    # the heatmap's colour bar: 0–100, titled with its unit and kind; the same at another τ
    def colour_bar():
        return page.evaluate(
            "() => { const t = document.querySelector('#heatmap').data[0];"
            " return [t.zmin, t.zmax, t.colorbar.title.text]; }"
        )

    page.wait_for_function("() => document.querySelector('#heatmap')?.data")
    assert colour_bar() == [0, 100, "unchanged<br>% of weights (sequential)"]
    bar_title = page.locator("#heatmap .colorbar .cbtitle").text_content()
    assert "% of weights" in bar_title and "sequential" in bar_title
    cell = "() => document.querySelector('#heatmap').data[0].customdata[0][0]"
    before = page.evaluate(cell)
    k = int(page.input_value("#tau-slider"))
    page.fill("#tau-slider", str(k + 20))  # another τ: the same colour range
    page.wait_for_function(f"() => ({cell})() > {before}")
    assert colour_bar() == [0, 100, "unchanged<br>% of weights (sequential)"]
    page.fill("#tau-slider", str(k))
    shot(page, "pair-table")

    # sort by sparsity: descending, then ascending; in the URL
    page.click("#matrix-table th[data-key=sparsity] button")
    assert page.locator("#matrix-table th[data-key=sparsity]").get_attribute("aria-sort") == "descending"
    values = percents(column(page, "sparsity"))
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    page.click("#matrix-table th[data-key=sparsity] button")
    assert page.locator("#matrix-table th[data-key=sparsity]").get_attribute("aria-sort") == "ascending"
    assert percents(column(page, "sparsity")) == sorted(values)
    page.wait_for_url(re.compile(r"sort=sparsity"))

    # the filter narrows the rows; the CSV holds exactly the rows shown, in their order
    page.fill("#matrix-table-filter", "q_proj")
    page.wait_for_url(re.compile(r"q=q_proj"))
    shown = column(page, "name")
    assert shown and len(shown) == sum("q_proj" in t["name"] for t in tensors) < len(tensors)
    with page.expect_download() as download:
        page.click("#matrix-table-csv")
    table = list(csv.reader(io.StringIO(download.value.path().read_text())))
    assert table[0][:3] == ["matrix", "layer", "type"] and [r[0] for r in table[1:]] == shown
    assert [float(r[5]) for r in table[1:]] == sorted(float(r[5]) for r in table[1:])

    # the permalink reproduces sort and filter
    other, fresh = new_page(browser)
    fresh.goto(page.url)
    fresh.locator("#matrix-table tbody tr[data-index]").first.wait_for()
    assert column(fresh, "name") == shown and fresh.input_value("#matrix-table-filter") == "q_proj"
    other.close()

    # a chart's PNG from the modebar (Plotly's toImage in the partial bundle)
    page.hover("#heatmap")
    with page.expect_download() as download:
        page.locator("#heatmap .modebar-btn[data-title='Download plot as a PNG']").click()
    assert download.value.path().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a heatmap's CSV: its grid, in %
    with page.expect_download() as download:
        page.locator("#heatmap").locator("xpath=preceding-sibling::div[1]").locator("button.csv").click()
    grid = list(csv.reader(io.StringIO(download.value.path().read_text())))
    assert grid[1][0] == "layer 0" and all(0 <= float(v) <= 100 for row in grid[1:] for v in row[1:] if v)

    # keyboard: from the filter box down into the table, Enter opens the matrix
    page.fill("#matrix-table-filter", "")
    page.focus("#matrix-table-filter")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    second = column(page, "name")[1]
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/tensor\?name="))
    assert page.locator("#tensor-name").inner_text() == second
    assert not page.errors, page.errors
    context.close()

    dark, page = new_page(browser, color_scheme="dark")
    page.goto(f"{url}/analyses/{aid}?sort=-changed")
    page.locator("#matrix-table tbody tr[data-index]").first.wait_for()
    shot(page, "pair-table-dark")
    assert not page.errors, page.errors
    dark.close()


def test_a_table_of_thousands_of_matrices_stays_light(pair, browser):
    """1,500 rows (the artifact's, repeated under new names): only those in view are in the DOM, and
    the keyboard reaches the last one."""
    url, client, aid = pair
    rows = client.get(f"/api/analyses/{aid}/tensors").json()
    many = [{**r, "name": f"{r['name']}#{k}"} for k in range(-(-1500 // len(rows))) for r in rows][:1500]
    context, page = new_page(browser)
    page.route(f"**/api/analyses/{aid}/tensors", lambda route: route.fulfill(json=many))
    page.goto(f"{url}/analyses/{aid}")
    page.locator("#matrix-table tbody tr[data-index]").first.wait_for()
    assert page.locator("#matrix-table-count").inner_text() == "1500 of 1500 matrices"
    assert page.locator("#matrix-table tbody tr").count() < 100
    page.focus(".table-scroll")
    page.keyboard.press("End")
    page.locator("#matrix-table-row-1499").wait_for()
    assert page.get_attribute(".table-scroll", "aria-activedescendant") == "matrix-table-row-1499"
    assert page.locator("#matrix-table tbody tr").count() < 100
    assert not page.errors, page.errors
    context.close()


def test_matrix_view_counts_at_the_page_tau_and_neighbours(pair, browser):
    url, client, aid = pair
    name = "model.layers.1.self_attn.q_proj.weight"  # the last layer of the tiny llama
    detail = client.get(f"/api/analyses/{aid}/tensors/{name}").json()
    exact = next(c["count"] for c in detail["changed"] if c["mode"] == "abs" and c["tau"] == 1e-5)
    context, page = new_page(browser)
    page.goto(f"{url}/analyses/{aid}/tensor?name={name}&tau=1e-5")
    page.locator("#tensor-changed").wait_for()
    assert page.locator("#tensor-changed").inner_text() == f"{exact:,}"
    assert page.locator("[data-nav=next]").is_disabled() and page.locator("[data-nav=prev]").is_enabled()
    siblings = page.locator("[data-sibling]").all_inner_texts()
    assert len(siblings) == len(set(siblings)) > 0
    shot(page, "tensor-view")
    # another τ: the count the API reads from the histograms at that τ
    at = client.get(f"/api/analyses/{aid}/tensor-changed", params={"tau": 1e-3}).json()
    count = at["changed"][at["names"].index(name)]
    edge = nearest_edge_index(1e-3)
    assert at["tau"] == BIN_EDGES[edge] and count == changed_from_histogram(detail["histograms"]["abs"], edge)
    assert sorted(at["names"]) == sorted(t["name"] for t in client.get(f"/api/analyses/{aid}/tensors").json())
    page.goto(f"{url}/analyses/{aid}/tensor?name={name}&tau=0.001")
    page.locator("#update-map-tau").wait_for()  # the map is stored at the first τ only: said so
    assert page.locator("#tensor-changed").inner_text() == f"{count:,}"
    # outside the layers: no layer neighbours at all
    page.goto(f"{url}/analyses/{aid}/tensor?name=model.norm.weight")
    page.locator("#tensor-changed").wait_for()
    assert page.locator("[data-nav]").count() == 0
    assert not page.errors, page.errors
    context.close()

    dark, page = new_page(browser, color_scheme="dark")
    page.goto(f"{url}/analyses/{aid}/tensor?name={name}")
    page.locator("#tensor-changed").wait_for()
    shot(page, "tensor-view-dark")
    assert not page.errors, page.errors
    dark.close()
