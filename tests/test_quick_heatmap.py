"""The overview's quick heatmap (frontend/src/quickheatmap.ts) in a real browser: with Plotly's chunk held
back it is the page's heatmap (every cell, its value, axis labels, colour bar; a click opens the matrix);
its cells are the colours Plotly then paints, pixel for pixel, and Plotly's chart replaces it in place."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlparse

import pytest
from test_dashboard import new_page
from test_views_pair_tensor import browser, pair  # noqa: F401 (fixtures)

playwright = pytest.importorskip("playwright.sync_api")
PLOTLY_CHUNK = "**/assets/plotly-*.js"
# each cell's box in the page and its fill, from the quick heatmap's SVG
CELLS = """() => [...document.querySelectorAll('#heatmap .quick-heatmap .cells rect')].map((r) => {
  const b = r.getBoundingClientRect();
  return {i: +r.dataset.i, j: +r.dataset.j, x: b.x, y: b.y, fill: r.getAttribute('fill')};
})"""
# [r, g, b] at each (x, y) of a PNG (base64), decoded by the browser without colour conversion
PIXELS = """async ([png, points]) => {
  const blob = await (await fetch('data:image/png;base64,' + png)).blob();
  const image = await createImageBitmap(blob, {colorSpaceConversion: 'none'});
  const canvas = new OffscreenCanvas(image.width, image.height);
  const context = canvas.getContext('2d');
  context.drawImage(image, 0, 0);
  return points.map(([x, y]) => [...context.getImageData(x, y, 1, 1).data.slice(0, 3)]);
}"""


def hold_plotly(page) -> list:
    """Keep Plotly's chunk from loading until the returned requests are continued."""
    held = []
    page.route(PLOTLY_CHUNK, lambda route: held.append(route))
    return held


def release(page, held: list) -> None:
    for route in held:
        route.continue_()
    page.unroute(PLOTLY_CHUNK)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_quick_heatmap_is_plotlys_heatmap_until_plotly_replaces_it(pair, browser, theme):  # noqa: F811
    url, client, aid = pair
    cube = client.get(f"/api/analyses/{aid}/heatmap-cube").json()
    tensors = client.get(f"/api/analyses/{aid}/tensors").json()
    context, page = new_page(browser)
    page.add_init_script(f"localStorage.setItem('deltalens-theme', '{theme}')")
    held = hold_plotly(page)
    page.goto(f"{url}/analyses/{aid}")
    quick = page.locator("#heatmap .quick-heatmap")
    quick.wait_for()
    assert page.locator("#heatmap .nsewdrag").count() == 0 and held, "Plotly drew first"

    # every compared cell, its value as the table shows it, the axes and the colour bar
    cells = page.evaluate(CELLS)
    filled = {(i, j) for i, row in enumerate(cube["numel"]) for j, n in enumerate(row) if n}
    assert {(c["i"], c["j"]) for c in cells} == filled
    layers = [f"layer {x}" if x is not None else "other" for x in cube["layers"]]
    assert quick.locator(".yt").all_text_contents() == layers
    assert quick.locator(".xt").all_text_contents() == cube["matrices"]
    assert quick.locator(".cbtick").all_text_contents() == ["0", "20", "40", "60", "80", "100"]
    assert quick.locator(".cbtitle").text_content() == "unchanged% of weights (sequential)"
    texts = quick.locator(".celltext").all_text_contents()
    assert len(texts) == len(filled) and all(t.endswith("%") for t in texts)
    # a cell's value is its matrices' exact share unchanged at the page's τ (1e-5, asked for)
    i, j = cells[0]["i"], cells[0]["j"]
    at = [t for t in tensors if t["layer"] == cube["layers"][i] and t["matrix"] == cube["matrices"][j]]
    share = 1 - sum(t["changed"][0]["count"] for t in at) / cube["numel"][i][j]
    assert texts[0] == f"{100 * share:.2f}%"
    # reversed Viridis on 0–100 %: its ends are Plotly's Viridis ends
    if share == 1:
        assert cells[0]["fill"] == "rgb(68,1,84)"
    before = page.locator("#heatmap").screenshot()

    release(page, held)
    page.locator("#heatmap .nsewdrag").wait_for()
    assert quick.count() == 0, "the quick heatmap stays after Plotly's"
    page.mouse.move(0, 0)
    page.wait_for_timeout(200)  # Plotly's last frame
    after = page.locator("#heatmap").screenshot()
    box = page.locator("#heatmap").bounding_box()
    # the colour of each cell, a few pixels inside its corner (clear of its value), before and after
    points = [[round(c["x"] - box["x"]) + 3, round(c["y"] - box["y"]) + 3] for c in cells]
    blank = browser.new_page()  # decodes the screenshots (the dashboard's CSP allows no data: fetch)
    quick_px, plotly_px = (
        blank.evaluate(PIXELS, [base64.b64encode(s).decode(), points]) for s in (before, after)
    )
    blank.close()
    fills = [[int(v) for v in c["fill"][4:-1].split(",")] for c in cells]
    assert quick_px == fills, "the page shows other colours than the quick heatmap's fills"
    assert plotly_px == fills, "Plotly paints the cells in other colours"
    assert page.errors == []
    context.close()


def test_a_quick_heatmap_cell_opens_its_matrix(pair, browser):  # noqa: F811
    url, client, aid = pair
    cube = client.get(f"/api/analyses/{aid}/heatmap-cube").json()
    tensors = client.get(f"/api/analyses/{aid}/tensors").json()
    context, page = new_page(browser)
    held = hold_plotly(page)
    page.goto(f"{url}/analyses/{aid}")
    cells = page.locator("#heatmap .quick-heatmap .cells rect")
    cells.first.wait_for()
    cell = cells.nth(cells.count() // 2)  # mid-chart: clear of the page's sticky header
    i, j = (int(cell.get_attribute(f"data-{k}")) for k in "ij")
    name = next(
        t["name"] for t in tensors if (t["layer"], t["matrix"]) == (cube["layers"][i], cube["matrices"][j])
    )
    cell.click()  # on its value: the text lets the click through to the cell
    page.wait_for_url("**/tensor?**")
    assert parse_qs(urlparse(page.url).query)["name"] == [name]
    release(page, held)
    context.close()
