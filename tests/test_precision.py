"""Precision-aware change: ULP histograms (both pair kernels), --masters, DuckDB rows, the detail API.

Checkpoints are built with torch so that the answer is known by construction: the target is the
base moved by exactly k steps of its own grid (torch.nextafter) at planted positions — across powers
of two, through zero, among subnormals — and every count is checked against an independent float64
NumPy computation (np.spacing on the base's dtype).
"""

from __future__ import annotations

import decimal
import json
import math

import duckdb
import httpx
import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from deltalens.backend import results
from deltalens.backend.catalog import Catalog
from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.contract import BIN_EDGES, ULP_BINS, ULP_EDGES, VISIBILITY_FLOOR, changed_from_histogram
from deltalens.worker.report import pair_summary
from deltalens.worker.store import write_artifact

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
STEPS = (1, 2, 3, 40)
ROWS, COLS = 24, 40


def step(x: torch.Tensor, k: int) -> torch.Tensor:
    """x moved k representable steps (k < 0: toward -inf) in its own dtype."""
    goal = torch.full_like(x, float("inf") if k > 0 else float("-inf"))
    for _ in range(abs(k)):
        x = torch.nextafter(x, goal)
    return x


def planted_base(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights with the hard cases written in: zeros, powers of two (binade edges, both
    signs), the largest value below a power of two, the smallest normal, subnormals."""
    g = torch.Generator().manual_seed(seed)
    b = (torch.randn(ROWS, COLS, generator=g) * 0.05).to(dtype)
    tiny = torch.finfo(dtype).tiny
    special = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0**-10, -(2.0**-3), tiny, -tiny, 3 * tiny]
    special = torch.tensor(special, dtype=torch.float64).to(dtype)
    below = step(torch.tensor([1.0, 0.25, 2.0**-6], dtype=dtype), -1)  # the top of a binade
    subnormal = step(torch.zeros(3, dtype=dtype), 5) * torch.tensor([1, -1, 1], dtype=dtype)
    special = torch.cat([special, below, subnormal])
    for r in range(8):  # rows 0..7 each get one of ±STEPS (planted_target)
        b[r, : len(special)] = special if r % 2 == 0 else -special
    return b


def planted_target(b: torch.Tensor, seed: int) -> torch.Tensor:
    """Each of rows 0..7 moved by one of ±STEPS (the special values included); other rows: random
    weights moved by a random ±k, k in STEPS, or left alone."""
    t = b.clone()
    for r, k in enumerate([s * sign for s in STEPS for sign in (1, -1)]):
        t[r] = step(b[r], k)
    g = torch.Generator().manual_seed(seed)
    ks = torch.tensor(STEPS)[torch.randint(len(STEPS), (ROWS - 8, COLS), generator=g)]
    ks = ks * torch.where(torch.rand(ROWS - 8, COLS, generator=g) < 0.5, 1, -1)
    ks = ks.masked_fill(torch.rand(ROWS - 8, COLS, generator=g) < 0.3, 0)
    for k in ks.unique().tolist():
        if k:
            t[8:] = torch.where(ks == k, step(b[8:], k), t[8:])
    return t


def spacing(b: torch.Tensor) -> np.ndarray:
    """ulp of the base's dtype at each base value: the spacing above |b| by NumPy (bf16: float32
    spacing · 2^16, the same binade with 16 fewer mantissa bits; subnormals: 2^-149 · 2^16 = bf16's
    smallest spacing). |b|, because NumPy's float16 spacing of a negative power of two is the step
    toward zero."""
    if b.dtype == torch.bfloat16:
        return np.spacing(np.abs(b.float().numpy())) * 2.0**16
    return np.spacing(np.abs(b.numpy())).astype(np.float64)


def ulp_reference(b: torch.Tensor, t: torch.Tensor) -> list[int]:
    """Counts over contract.ULP_EDGES: [u = 0], (E_{i-1}, E_i], (E_last, inf), u = |t − b| / ulp(b)."""
    u = np.abs(t.double().numpy() - b.double().numpy()) / spacing(b)
    slots = np.where(u == 0, 0, np.searchsorted(np.asarray(ULP_EDGES), u, side="left") + 1)
    return np.bincount(slots.ravel(), minlength=ULP_BINS).tolist()


def names(dtype: str) -> dict[str, str]:
    layer = list(DTYPES).index(dtype)
    return {m: f"model.layers.{layer}.{m}.weight" for m in ("self_attn.q_proj", "mlp.down_proj")}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One base / target pair per dtype (two matrices each), the tensors kept for the reference."""
    root = tmp_path_factory.mktemp("ulp")
    base, target = {}, {}
    for i, (dtype, torch_dtype) in enumerate(DTYPES.items()):
        for j, name in enumerate(names(dtype).values()):
            base[name] = planted_base(torch_dtype, 10 * i + j)
            target[name] = planted_target(base[name], 10 * i + j + 5)
    save_file(base, root / "base.safetensors")
    save_file(target, root / "target.safetensors")
    return root / "base.safetensors", root / "target.safetensors", base, target


def test_reference_knows_the_planted_steps():
    """The NumPy reference itself, on cases known by hand: k steps up from inside a binade are k ULPs;
    one step down from a power of two is half an ULP (bin 1); through zero among subnormals, k ULPs."""
    b = torch.tensor([1.25, 1.0, 0.0, -0.0, 2.0**-130], dtype=torch.bfloat16)
    for k in (1, 3):
        hist = ulp_reference(b, step(b, k))
        assert hist[k] == 5 and sum(hist) == 5, (k, hist)
    hist = ulp_reference(b[:2], step(b[:2], -1))
    assert hist[1] == 2  # 1.25 down: 1 ULP; 1.0 down: ½ ULP
    hist = ulp_reference(b[:1], step(b[:1], 40))  # 1.25 + 40 steps crosses 2.0: 24 + 16·2 = 56 ULPs
    assert hist[ULP_EDGES.index(64.0) + 1] == 1


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_ulp_histograms_match_numpy(planted, fused):
    base_path, target_path, base, target = planted
    result = run_analysis(
        "pair", [str(base_path), str(target_path)], Options(device="cpu", fused=fused, chunk_elements=200)
    )
    details = {d["name"]: d for d in result.details}
    total = np.zeros(ULP_BINS, np.int64)
    for name in base:
        expected = ulp_reference(base[name], target[name])
        d = details[name]
        assert d["ulp_hist"] == expected, name
        row = d["row"]
        assert row["ulp_hist"] == expected and row["one_ulp"] == expected[1]
        assert row["visibility_floor"] == VISIBILITY_FLOOR[row["dtype"]]
        assert sum(expected) == row["numel"] and expected[0] < row["numel"]
        assert all(expected[k] for k in (1, 2, 3)), name  # every planted step count shows up
        total += expected
    precision = result.document["summary"]["precision"]
    assert precision["ulp_hist"] == total.tolist()
    assert precision["one_ulp"] == total[1]
    assert precision["one_ulp_share"] == total[1] / total.sum()
    assert precision["one_ulp_of_changed"] == total[1] / (total.sum() - total[0])
    assert precision["dtypes"] == sorted(DTYPES)
    cells = {(c["layer"], c["matrix"]): c for c in precision["by_layer_matrix"]}
    for dtype in DTYPES:
        for matrix, name in zip(("q", "down"), names(dtype).values()):
            assert (
                cells[(list(DTYPES).index(dtype), matrix)]["one_ulp"]
                == ulp_reference(base[name], target[name])[1]
            )


def test_known_step_counts_by_construction(tmp_path):
    """Values in [1, 1.5) moved up by k steps: exactly k ULPs, so bin k holds exactly the plants."""
    b = (1 + torch.rand(16, 16, generator=torch.Generator().manual_seed(3)) / 2).to(torch.bfloat16)
    t = b.clone()
    t[:4], t[4:6], t[6:7] = step(b[:4], 1), step(b[4:6], 2), step(b[6:7], 3)
    save_file({"w.weight": b}, tmp_path / "b.safetensors")
    save_file({"w.weight": t}, tmp_path / "t.safetensors")
    for fused in (False, True):
        r = run_analysis(
            "pair",
            [str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")],
            Options(device="cpu", fused=fused),
        )
        hist = r.details[0]["ulp_hist"]
        assert hist[:4] == [9 * 16, 4 * 16, 2 * 16, 16] and sum(hist) == 256


def test_duckdb_rows_detail_and_heatmap(planted, tmp_path):
    """ulp_histograms rows, the matrix detail's ULP histogram and the one-ULP share heatmap."""
    base_path, target_path, base, target = planted
    result = run_analysis("pair", [str(base_path), str(target_path)], Options(device="cpu", rank=False))
    artifact = tmp_path / "a.duckdb"
    write_artifact(result, artifact, "p1")
    with duckdb.connect(str(artifact), read_only=True) as con:
        rows = con.execute(
            "SELECT name, dtype, counts, one_ulp FROM ulp_histograms WHERE analysis_id='p1'"
        ).fetchall()
    expected = {n: ulp_reference(base[n], target[n]) for n in base}
    assert {r[0]: r[2] for r in rows} == expected
    assert all(r[3] == expected[r[0]][1] for r in rows)
    assert {r[0]: r[1] for r in rows} == {n: d for d in DTYPES for n in names(d).values()}
    catalog = Catalog(tmp_path / "catalog.duckdb")
    try:
        catalog.add_job("p1", "pair", ["b", "t"], [1e-5], False, False)
        catalog.ingest("p1", artifact)
        name = names("BF16")["self_attn.q_proj"]
        detail = json.loads(results.tensor_detail(catalog, "p1", name))
        ulp = detail["ulp_histogram"]
        assert ulp["counts"] == expected[name] and ulp["one_ulp"] == expected[name][1]
        assert ulp["dtype"] == "BF16" and ulp["edges"] == list(ULP_EDGES)
        assert ulp["visibility_floor"] == 2.0**-8
        heat = results.heatmap(catalog, "p1", "one_ulp_share", 1e-5, "abs")
        for i, layer in enumerate(heat["layers"]):
            for j, matrix in enumerate(heat["matrices"]):
                n = names(list(DTYPES)[layer])["self_attn.q_proj" if matrix == "q" else "mlp.down_proj"]
                assert heat["values"][i][j] == expected[n][1] / base[n].numel()
    finally:
        catalog.close()


def test_masters_true_visible_hidden(tmp_path):
    """bf16 base; fp32 masters = base + δ with δ known: 0, sub-half-ULP (rounds back: hidden), or
    several ULPs (visible); the stored target is the masters rounded to bf16."""
    g = torch.Generator().manual_seed(7)
    b = (1 + torch.rand(32, 32, generator=g) / 2).to(torch.bfloat16)  # [1, 1.5): ULP 2^-7
    kind = torch.randint(3, b.shape, generator=g)  # 0: unchanged, 1: δ = 1e-3 (< ½ ULP), 2: δ = 0.03
    masters = b.float() + torch.tensor([0.0, 1e-3, 0.03])[kind]
    target = masters.to(torch.bfloat16)
    for folder, w in (("base", b), ("target", target), ("masters", masters)):
        (tmp_path / folder).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": w}, tmp_path / folder / "model.safetensors")
    n_small, n_big = int((kind == 1).sum()), int((kind == 2).sum())
    out = run_cli(
        "analyze",
        tmp_path / "base",
        tmp_path / "target",
        "--masters",
        tmp_path / "masters",
        "--tau",
        "1e-5",
        "1e-2",
        "--json",
        "-",
        "--out",
        tmp_path / "m.duckdb",
        check=True,
    )
    doc = json.loads(out.stdout)
    m = doc["masters"]
    counts = lambda key: [c["count"] for c in m[key]]  # noqa: E731
    assert counts("true") == [n_small + n_big, n_big]
    assert counts("visible") == [n_big, n_big]
    assert counts("hidden") == [n_small, 0]
    assert m["any"] == {"true": n_small + n_big, "visible": n_big, "hidden": n_small}
    assert m["compared"] == 1 and m["tensors"][0]["hidden"] == m["hidden"]
    # the same counts by NumPy from the tensors themselves
    bn, tn, mn = (x.double().numpy() for x in (b, target, masters))
    for i, tau in enumerate((1e-5, 1e-2)):
        tru, vis = np.abs(mn - bn) > tau, np.abs(tn - bn) > tau
        assert (counts("true")[i], counts("visible")[i], counts("hidden")[i]) == (
            tru.sum(),
            vis.sum(),
            (tru & ~vis).sum(),
        )
    text = pair_summary(doc)  # what the CLI prints without --json
    assert "true vs visible" in text and "at most one ULP" in text


# ---------------------------------------------------------------------------------------------
# The dashboard: exact τ labels and counts, the precision panels (Chromium, a running stack)
# ---------------------------------------------------------------------------------------------
def js_exponential(x: float) -> str:
    """What JavaScript's x.toExponential() prints: the shortest digits that read back as x."""
    sign, digits, exp = decimal.Decimal(repr(x)).normalize().as_tuple()
    text = "".join(map(str, digits))
    e = exp + len(text) - 1
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


@pytest.fixture(scope="module")
def bf16_site(tmp_path_factory):
    """A running API + worker over a bf16 Phi-3 pair: 1-ULP steps on a fifth of the weights, larger
    random moves on others."""
    service = pytest.importorskip("service")
    from conftest import build, perturb_, save

    root = tmp_path_factory.mktemp("precision-site")
    model = build("phi3")
    base = save(model, "phi3", root / "models" / "base")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            one = torch.rand(p.shape, generator=g) < 0.2
            p.copy_(torch.where(one, step(p, 1), p))
    perturb_(model, seed=3, fraction=0.1)
    target = save(model, "phi3", root / "models" / "target")
    (root / "results").mkdir()
    env = service.service_env(
        root / "data", "filesystem://", f"file://{root / 'results'}", "precision", [root / "models"]
    )
    stack = service.Worker(env, root / "worker.log"), service.Api(env, root / "api.log")
    with service.running(*stack) as (_, api):
        client = httpx.Client(base_url=api.url, timeout=30)
        ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)]
        aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids, "taus": [1e-5, 3e-4]})
        aid = aid.json()["id"]
        assert service.wait_done(client, aid)["status"] == "done"
        yield api.url, client, aid


def test_dashboard_exact_tau_and_precision_panels(bf16_site):
    playwright = pytest.importorskip("playwright.sync_api")
    from test_dashboard import ARGS, CHROMIUM, new_page, shot

    url, client, aid = bf16_site
    summary = client.get(f"/api/analyses/{aid}/summary").json()
    precision = summary["summary"]["precision"]
    assert precision["dtypes"] == ["BF16"] and precision["one_ulp"] > 0
    heat = client.get(f"/api/analyses/{aid}/heatmap", params={"metric": "one_ulp_share"}).json()
    assert any(v is not None and v > 0.1 for row in heat["values"] for v in row)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context, page = new_page(browser)
        page.goto(f"{url}/analyses/{aid}?tau=0.0003")
        label = page.locator("#tau-value")
        label.wait_for()
        # a requested τ: shown as given, with the document's exact count
        assert label.inner_text() == "3e-4 (requested: exact count)"
        assert (
            page.locator("#global-changed").inner_text() == f"{summary['summary']['changed'][1]['count']:,}"
        )
        # on a histogram edge: the edge's true value, and the count above that edge
        cube = client.get(f"/api/analyses/{aid}/heatmap-cube").json()
        k = BIN_EDGES.index(min(BIN_EDGES, key=lambda e: abs(math.log10(e) + 5)))
        page.eval_on_selector(
            "#tau-slider", f"el => {{ el.value = {k}; el.dispatchEvent(new Event('input')); }}"
        )
        assert (
            label.inner_text() == js_exponential(BIN_EDGES[k])
            and float(label.inner_text()) == BIN_EDGES[k] != 1e-5
        )
        above = sum(changed_from_histogram(h, k) for row in cube["hist"] for h in row if h)
        assert page.locator("#global-changed").inner_text() == f"{above:,}"
        panel = page.locator("#precision")
        panel.scroll_into_view_if_needed()
        assert page.locator("#precision-count").inner_text() == f"{precision['one_ulp']:,}"
        assert "cannot show updates smaller than one step" in panel.inner_text()
        shot(page, "precision-pair")
        name = "model.layers.0.mlp.down_proj.weight"
        detail = client.get(f"/api/analyses/{aid}/tensors/{name}").json()
        page.goto(f"{url}/analyses/{aid}/tensor?name={name}&mode=rel")
        page.locator("#precision").wait_for()
        assert page.locator("#precision-count").inner_text() == f"{detail['ulp_histogram']['one_ulp']:,}"
        assert "visibility floor of BF16, 2^-8" in page.locator("main, body").first.inner_text()
        shot(page, "precision-tensor")
        assert not page.errors, page.errors
        context.close()
        browser.close()
