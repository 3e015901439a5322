"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a running stack
with a real worker: upload through the page, follow progress, heatmap, τ slider, click to a
matrix, permalinks in a fresh context. Screenshots of every view go to test-output/."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from service import ROOT, Api, Worker, running, service_env, wait_done

from deltalens.worker.contract import BIN_EDGES, changed_from_histogram

playwright = pytest.importorskip("playwright.sync_api")
DIST = ROOT / "backend" / "dashboard" / "index.html"  # vite outDir: served by the API
SHOTS = ROOT / "test-output" / "screenshots"
DRAWN = "() => [...document.querySelectorAll('.plot')].every((p) => p.querySelector('.main-svg'))"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-quic",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory, family_pair, llama_series):
    assert DIST.exists(), "build the dashboard first: make test runs `npm run build` in frontend/"
    root = tmp_path_factory.mktemp("dash")
    (root / "results").mkdir()
    roots = [family_pair("llama")[0].parent, llama_series[0].parent]
    env = service_env(root / "data", "filesystem://", f"file://{root / 'results'}", "dash", roots)
    with running(Worker(env, root / "worker.log"), Api(env, root / "api.log")) as (_, api):
        yield api.url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    # figures draw one per task (frontend/src/plot.ts): every one on the page drawn first
    page.wait_for_function(DRAWN)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def new_page(browser, **kw):
    """A fresh context's page; page errors and Content-Security-Policy violations land in page.errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, **kw)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if "Content Security Policy" in m.text else None)
    return context, page


def test_upload_analyse_slide_click_and_share(site, browser, family_pair):
    base, target = family_pair("llama")
    context, page = new_page(browser)
    errors = page.errors
    page.goto(site + "/new")
    for folder, name in ((base, "llama-base"), (target, "llama-target")):
        page.fill("#upload-name", name)
        page.set_input_files(
            "#file-input", [str(p) for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")]
        )
        page.get_by_text(f"Uploaded and validated: {name}").wait_for(timeout=30_000)
    assert page.locator("progress").count() >= 2  # a bar per file
    shot(page, "new-analysis")
    page.fill("#taus", "1e-5")
    page.click("#submit")
    started = time.monotonic()
    page.wait_for_url(re.compile(r"/analyses/[0-9a-f]+$"), timeout=120_000)
    page.locator("#heatmap .nsewdrag").wait_for(timeout=60_000)
    print(f"time from submit to first heatmap: {time.monotonic() - started:.2f}s")
    aid = page.url.rsplit("/", 1)[1]
    shot(page, "overview")

    # the numbers on the page are the engine's: global sparsity at the snapped τ, from the histograms
    detail = httpx.get(f"{site}/api/analyses/{aid}/heatmap-cube").json()

    def expected(k):
        changed = sum(changed_from_histogram(h, k) for row in detail["hist"] for h in row if h)
        numel = sum(n for row in detail["numel"] for n in row if n)
        return f"{100 * (1 - changed / numel):.2f}%"

    slider = page.locator("#tau-slider")
    k0 = int(slider.input_value())
    assert BIN_EDGES[k0] == pytest.approx(1e-5, rel=0.01)
    before = page.locator("#global-sparsity").inner_text()
    assert before == expected(k0)
    slider.focus()
    for _ in range(40):
        page.keyboard.press("ArrowRight")  # keyboard reachable; each step is one histogram edge
    after = page.locator("#global-sparsity").inner_text()
    assert after != before and after == expected(k0 + 40)
    slider.dispatch_event("change")
    page.wait_for_url(re.compile(r"tau="))
    shot(page, "overview-tau-moved")

    # click a heatmap cell: layer 0, first matrix type -> that matrix's view
    box = page.locator("#heatmap .nsewdrag").bounding_box()
    rows, cols = len(detail["layers"]), len(detail["matrices"])
    page.mouse.click(box["x"] + box["width"] / cols / 2, box["y"] + box["height"] / rows / 2)
    page.wait_for_url(re.compile(r"/tensor\?name="), timeout=10_000)
    name = page.locator("#tensor-name").inner_text()
    assert name.startswith("model.layers.0.")
    page.locator(".plot .main-svg").first.wait_for()
    shot(page, "tensor")

    # copy the permalink and open it in a fresh context: the identical view
    page.click("#copy-link")
    page.wait_for_function("() => document.body.dataset.shortLink !== undefined")
    link, short = page.evaluate("[document.body.dataset.lastLink, document.body.dataset.shortLink]")
    assert link == page.url and "tau=" in link
    other, fresh = new_page(browser)
    fresh.goto(link)
    assert fresh.locator("#tensor-name").inner_text() == name
    fresh.goto(short)
    fresh.locator("#tensor-name").wait_for()
    assert fresh.url == link and fresh.locator("#tensor-name").inner_text() == name
    other.close()
    # neighbours are one click away
    page.click("[data-nav=next]")
    page.wait_for_function(
        "() => (document.querySelector('#tensor-name')?.textContent ?? '').startsWith('model.layers.1.')"
    )
    assert not errors, errors
    context.close()


def test_browse_series_overlap_compare_views(site, browser, llama_series, family_pair):
    client = httpx.Client(base_url=site, timeout=30)
    ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in llama_series]
    series = client.post("/api/analyses", json={"kind": "series", "checkpoints": ids}).json()["id"]
    overlap = client.post("/api/analyses", json={"kind": "overlap", "checkpoints": ids[:4]}).json()["id"]
    pairs = [
        client.post("/api/analyses", json={"kind": "pair", "checkpoints": [ids[0], ids[i]]}).json()["id"]
        for i in (1, 4)
    ]
    for aid in (series, overlap, *pairs):
        assert wait_done(client, aid)["status"] == "done"
    context, page = new_page(browser, color_scheme="dark")
    errors = page.errors
    page.goto(site + "/")
    page.locator(f"tr[data-analysis='{series}']").wait_for()
    shot(page, "browse")
    page.fill("input[type=search]", "overlap")
    page.wait_for_url(re.compile(r"q=overlap"))
    assert (
        page.locator("tbody tr").count() >= 1 and page.locator(f"tr[data-analysis='{series}']").count() == 0
    )
    page.goto(f"{site}/analyses/{series}")
    page.wait_for_url(re.compile(r"/series$"))
    page.locator("#transient").wait_for()
    doc = client.get(f"/api/analyses/{series}/series").json()
    assert (
        page.locator("#transient").inner_text()
        == f"{100 * doc['categories']['transient'] / doc['numel']:.2f}%"
    )
    page.locator(".plot .main-svg").first.wait_for()
    shot(page, "series")
    page.goto(f"{site}/analyses/{overlap}")
    page.wait_for_url(re.compile(r"/overlap$"))
    page.locator("#overlap-pairs").wait_for()
    page.locator(".plot .main-svg").first.wait_for()
    assert page.locator("#overlap-pairs tbody tr").count() == 3
    shot(page, "overlap")
    page.goto(f"{site}/compare?ids={pairs[0]},{pairs[1]}")
    page.locator(".plot .main-svg").first.wait_for()
    assert page.locator("table tbody tr").count() == 2
    shot(page, "compare")
    assert not errors, errors
    context.close()


def test_errors_are_shown_not_thrown(site, browser):
    context, page = new_page(browser)
    page.goto(site + "/analyses/0123456789ab")
    page.locator(".error").wait_for()
    assert "no analysis" in page.locator(".error").inner_text()
    context.close()


HOSTILE = '<a href="https://example.com">x</a><span style="font-size:80px">big</span>'


def test_names_are_text_in_charts(site, browser, family_pair):
    """A checkpoint named with Plotly markup is drawn as literal text in legends and hover labels:
    no link, no styled span inside the plot (Plotly renders names as pseudo-HTML unless escaped)."""
    base, target = family_pair("llama")
    context, page = new_page(browser)
    page.goto(site + "/new")
    page.fill("#upload-name", HOSTILE)
    page.set_input_files(
        "#file-input", [str(p) for p in sorted(target.iterdir()) if p.suffix in (".safetensors", ".json")]
    )
    page.get_by_text(f"Uploaded and validated: {HOSTILE}").wait_for(timeout=30_000)
    client = httpx.Client(base_url=site, timeout=30)
    hostile = next(c["id"] for c in client.get("/api/checkpoints").json() if c["name"] == HOSTILE)
    plain = client.post("/api/checkpoints", json={"path": str(base)}).json()["id"]
    ids = [
        client.post("/api/analyses", json={"kind": "pair", "checkpoints": pair}).json()["id"]
        for pair in ([plain, hostile], [hostile, plain])
    ]
    for aid in ids:
        assert wait_done(client, aid)["status"] == "done"
    page.goto(f"{site}/compare?ids={ids[0]},{ids[1]}")
    page.locator(".plot .legend .legendtext").nth(1).wait_for()
    legend = page.locator(".plot .legend .legendtext").all_text_contents()
    assert legend == [f"base → {HOSTILE}", f"{HOSTILE} → base"], legend
    # hover a point: its label names the analysis, as text
    box = page.locator(".plot .scatterlayer .trace").first.locator(".points path").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.locator(".plot .hoverlayer .hovertext").first.wait_for(timeout=10_000)
    hover = page.locator(".plot .hoverlayer .hovertext").first.text_content()
    assert HOSTILE in hover and "sparsity" in hover, hover
    shot(page, "names-as-text")
    svg = page.locator(".plot svg")
    assert svg.locator("a").count() == 0  # Plotly turns <a href> into an SVG link when unescaped
    assert page.locator(".plot [style*='80px']").count() == 0
    assert "<a href" in "".join(svg.all_text_contents())
    # the analysis' own view names it as text too
    page.goto(f"{site}/analyses/{ids[1]}")
    page.locator("#heatmap .nsewdrag").wait_for(timeout=60_000)
    assert page.locator("h1").inner_text() == client.get(f"/api/analyses/{ids[1]}").json()["title"]
    assert page.locator("h1 + p").inner_text().startswith(f"{HOSTILE} → base · ")
    assert page.locator(".plot svg a").count() == 0
    assert not page.errors, page.errors
    context.close()


def test_adapter_figures_on_the_pair_page(site, browser, family_pair):
    """A LoRA adapter registered next to its base (the New page's path field, through the API): the
    pair page shows one row per adapted module with the exact ΔW counts of the result document."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    base = family_pair("llama")[0]
    adapter = base.parent / "adapter"
    if not adapter.exists():
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16),
            peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        )
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(adapter)
    client = httpx.Client(base_url=site, timeout=30)
    ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, adapter)]
    aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
    assert wait_done(client, aid)["status"] == "done"
    (figures,) = client.get(f"/api/analyses/{aid}/summary").json()["adapters"]
    context, page = new_page(browser)
    page.goto(f"{site}/analyses/{aid}")
    rows = page.locator("#adapter-figures tbody tr")
    rows.first.wait_for()
    assert rows.count() == len(figures["modules"]) > 0
    first = figures["modules"][0]
    cells = rows.first.locator("td").all_inner_texts()
    assert cells[0] == first["name"] and cells[1] == str(first["r"]) == "4"
    assert cells[3] == f"{first['changed'][0]['count']:,}"
    assert cells[6] == f"{first['rank']} / {first['full_rank']}"
    shot(page, "pair-adapter")
    assert not page.errors, page.errors
    context.close()


def test_geometry_and_precision_panels(site, browser, family_pair):
    """The pair page's Geometry panel draws one heatmap per figure the API has, and the matrix view
    shows that matrix's geometry: energy vs k and the enrichment table with the document's counts."""
    base, target = family_pair("llama")
    client = httpx.Client(base_url=site, timeout=30)
    ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)]
    aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
    assert wait_done(client, aid)["status"] == "done"
    view = client.get(f"/api/analyses/{aid}/geometry").json()
    context, page = new_page(browser)
    page.goto(f"{site}/analyses/{aid}")
    panel = page.locator("#geometry-panel")
    panel.locator(".plot .main-svg").first.wait_for()
    assert panel.locator("h3").count() == 2 + sum(
        e["percent"] == 1 for e in view["enrichment"] if e["selector"] in ("magnitude", "principal")
    )
    # the panel sits before "Skipped tensors", wherever its figures arrive
    titles = page.locator("section.panel > h2").all_inner_texts()
    assert titles.index("Skipped tensors") > next(i for i, t in enumerate(titles) if t.startswith("Geometry"))
    shot(page, "pair-geometry")
    name = "model.layers.0.self_attn.q_proj.weight"
    detail = client.get(f"/api/analyses/{aid}/tensors/{name}").json()
    page.goto(f"{site}/analyses/{aid}/tensor?name={name}")
    table = page.locator("#enrichment-table")
    table.wait_for()
    enrichment = detail["geometry"]["enrichment"]
    rows = enrichment["magnitude"] + enrichment["principal"]
    assert table.locator("tbody tr").count() == len(rows) > 0
    cells = table.locator("tbody tr").first.locator("td").all_inner_texts()
    assert cells[3] == f"{rows[0]['observed']:,}"  # exact count of changed weights in the selection
    shot(page, "tensor-geometry")
    assert not page.errors, page.errors
    context.close()
