"""The Overlap, Series and Compare views in a real browser against a running stack (issue 16): Venn
labels that never overlap, an overlap axis per layer, a series τ control and real step numbers, a
comparison of a 2-layer and a 4-layer model with layers in numeric order and a difference heatmap.
Screenshots (light and dark) go to test-output/screenshots/."""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from conftest import perturb_
from service import Api, Worker, running, service_env, wait_done
from test_dashboard import ARGS, CHROMIUM, DIST, DRAWN, new_page, shot
from transformers import LlamaConfig, LlamaForCausalLM

playwright = pytest.importorskip("playwright.sync_api")
THEMES = ("light", "dark")


@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory):
    """(base, target) of a 4-layer tiny llama: compared next to the 2-layer one of family_pair."""
    root = tmp_path_factory.mktemp("deep")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    perturb_(model, seed=3)
    model.save_pretrained(root / "target")
    return root / "base", root / "target"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, family_pair, llama_series, deep_pair):
    """The running API and worker, and the ids of the analyses every test reads."""
    assert DIST.exists(), "build the dashboard first: make test runs `npm run build` in frontend/"
    root = tmp_path_factory.mktemp("views")
    (root / "results").mkdir()
    roots = [family_pair("llama")[0].parent, llama_series[0].parent, deep_pair[0].parent]
    env = service_env(root / "data", "filesystem://", f"file://{root / 'results'}", "views", roots)
    # one intra-op thread: on a busy 2-core machine torch's thread pool makes the overlap's small
    # sign-agreement matmuls ~1000x slower (kernels.MaskAccumulator._signs)
    env["OMP_NUM_THREADS"] = "1"
    with running(Worker(env, root / "worker.log"), Api(env, root / "api.log")) as (_, api):
        client = httpx.Client(base_url=api.url, timeout=30)

        def register(paths):
            return [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in paths]

        def submit(kind: str, checkpoints: list[str], **extra) -> str:
            body = {"kind": kind, "checkpoints": checkpoints, "geometry": False, **extra}
            return client.post("/api/analyses", json=body).json()["id"]

        series = register(llama_series)
        ids = {
            "series": submit("series", series, taus=[1e-5]),
            "series_coarse": submit("series", series, taus=[1e-3]),
            "overlap": submit("overlap", series[:4]),
            "shallow": submit("pair", register(family_pair("llama"))),
            "deep": submit("pair", register(deep_pair)),
        }
        for aid in ids.values():
            assert wait_done(client, aid)["status"] == "done", aid
        yield api.url, client, ids


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def pages(browser):
    """A page per theme; each test checks that none of them saw an error."""
    for theme in THEMES:
        context, page = new_page(browser, color_scheme=theme)
        yield theme, page
        assert not page.errors, page.errors
        context.close()


def plotted(page, selector: str) -> list:
    """The traces Plotly drew in the plot under `selector` (its data, as the page holds it)."""
    return page.eval_on_selector(f"{selector} .plot", "el => el.data.map((t) => t.y)")


def ticks(page, selector: str, axis: str = "x") -> list[str]:
    return page.locator(f"{selector} .{axis}tick text").all_text_contents()


def overlaps(a: dict, b: dict) -> bool:
    apart_x = a["right"] <= b["left"] or b["right"] <= a["left"]
    return not (apart_x or a["bottom"] <= b["top"] or b["bottom"] <= a["top"])


def test_overlap_view(stack, browser):
    site, client, ids = stack
    for theme, page in pages(browser):
        page.goto(f"{site}/analyses/{ids['overlap']}/overlap")
        page.locator("#venn .main-svg").first.wait_for()
        page.wait_for_function(DRAWN)
        boxes = page.eval_on_selector_all(
            "#venn .annotation-text-g", "els => els.map((e) => e.getBoundingClientRect().toJSON())"
        )
        assert len(boxes) == 3
        assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), boxes
        # regions in words, terms explained, lift and z in the pair table
        regions = page.locator("#venn-regions tbody td:first-child").all_text_contents()
        assert "only A" in regions and "all of A, B, C" in regions
        assert page.locator("#overlap-terms dt").all_text_contents()[:3] == ["o1", "o2", "random"]
        assert {"lift", "z"} <= set(page.locator("#overlap-pairs th").all_text_contents())
        assert "overlap" in page.locator("#overlap-layers .ytitle").text_content()
        # baselines dashed, in their pair's colour
        lines = page.eval_on_selector("#overlap-layers .plot", "el => el.data.map((t) => t.line)")
        assert [line["dash"] for line in lines[:2]] == ["solid", "dash"]
        assert lines[0]["color"] == lines[1]["color"]
        shot(page, f"views-overlap-{theme}")


def test_series_view(stack, browser):
    site, client, ids = stack
    for theme, page in pages(browser):
        page.goto(f"{site}/analyses/{ids['series']}/series")
        page.locator("#layer-lines .main-svg").first.wait_for()
        page.wait_for_function(DRAWN)
        assert page.locator("#series-title").inner_text() == "Training series: base → step4"
        assert ticks(page, "#transient-fraction") == ["1", "2", "3", "4"]
        assert page.locator("#transient-fraction .xtitle").text_content() == "training step"
        assert len(plotted(page, "#layer-lines")) == 3  # layer 0, layer 1, other
        before = plotted(page, "#transient-fraction")
        shot(page, f"views-series-{theme}")
        # τ control: the other τ of the same checkpoints, a new URL and other values
        page.click("#series-taus button[aria-pressed=false]")
        page.wait_for_url(re.compile(f"/analyses/{ids['series_coarse']}/series$"))
        page.locator("#series-taus button[aria-pressed=true][data-tau='0.001']").wait_for()
        page.locator("#layer-lines .main-svg").first.wait_for()
        after = plotted(page, "#transient-fraction")
        expected = client.get(f"/api/analyses/{ids['series_coarse']}/series").json()
        assert after == [[100 * s["transient_fraction"] for s in expected["steps"]]]
        assert after != before


def test_compare_view(stack, browser):
    site, client, ids = stack
    # the API's per-layer relative change: ‖Δ‖/‖W‖ of the layer's summed squares, read from the tensors
    deep = ids["deep"]
    cmp = client.get("/api/compare", params={"ids": deep, "metric": "relative_change"}).json()
    rows = client.get(f"/api/analyses/{deep}/tensors").json()
    for layer in cmp["analyses"][0]["layers"]:
        mine = [r for r in rows if r["layer"] == layer["layer"]]
        delta, base = (sum(r[k] ** 2 for r in mine) ** 0.5 for k in ("norm_delta", "norm_base"))
        assert layer["value"] == pytest.approx(delta / base, rel=1e-9)
    for theme, page in pages(browser):
        page.goto(f"{site}/compare?ids={ids['shallow']},{ids['deep']}")
        page.locator("#compare-difference .main-svg").first.wait_for()
        page.wait_for_function(DRAWN)
        assert ticks(page, "#compare-layers") == ["layer 0", "layer 1", "layer 2", "layer 3", "other"]
        assert ticks(page, "#compare-difference", "y")[::-1] == ticks(
            page, "#compare-layers"
        )  # reversed axis
        assert "diverging" in page.locator("#compare-difference .cbtitle").text_content()
        shot(page, f"views-compare-{theme}")
        sparsity = plotted(page, "#compare-layers")
        page.select_option("#compare-metric", "relative_change")
        page.wait_for_url(re.compile(r"metric=relative_change"))
        page.locator("#compare-difference .main-svg").first.wait_for()
        assert plotted(page, "#compare-layers") != sparsity
        slider = page.locator("#compare-tau")
        slider.fill(str(int(slider.input_value()) + 20))
        slider.dispatch_event("change")
        page.wait_for_url(re.compile(r"tau=[0-9.e-]+&metric=relative_change|metric=relative_change.*tau="))
