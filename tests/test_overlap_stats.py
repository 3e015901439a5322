"""Overlap statistics (baselines, lift, hypergeometric z, UpSet, sign agreement) and series figures
(first change, kept / reverted, transient heatmap, ‖Δ‖ per step) on checkpoints where the answer is
planted, against float64 NumPy: through run_analysis, the CLI's JSON, DuckDB, the API and the dashboard."""

from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import pytest
import reference as ref
from conftest import build, run_cli, save

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.contract import MATRIX_TYPES
from deltalens.worker.store import write_artifact

TAU = 1e-5
STEP = 2e-3  # every planted Δ: far above τ and exact enough in float32 to keep its sign


def _state():
    model = build("llama").float()  # float32: every planted step is stored as planted
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _write(model, state: dict, deltas: dict, path):
    """Save the base state moved by `deltas` (name -> float64 array of the tensor's shape)."""
    import torch

    model.load_state_dict({k: v + torch.from_numpy(deltas[k]).to(v.dtype) for k, v in state.items()})
    return save(model, "llama", path)


def _density(name: str, run: int) -> float:
    """Run A is dense in the MLP, C in attention, B uniform: per-tensor densities differ, so the
    summed per-tensor baseline differs from |A||B|/N of the totals."""
    mlp, attn = "mlp" in name, "self_attn" in name
    return [0.3 if mlp else 0.05, 0.1, 0.2 if attn else 0.02][run]


@pytest.fixture(scope="module")
def planted_overlap(tmp_path_factory):
    """base and three runs: a shared mask S (20 % of q, 2 % elsewhere) changed in all three with
    signs A +, B +, C −, plus independent masks of tensor-dependent density with random signs."""
    root = tmp_path_factory.mktemp("overlap")
    model, state = _state()
    rng = np.random.default_rng(5)
    masks, signs = {}, {}
    for name, v in state.items():
        n = v.numel()
        shared = rng.random(n) < (0.2 if "q_proj" in name else 0.02)
        own = np.stack([rng.random(n) < _density(name, k) for k in range(3)])
        masks[name] = own | shared
        signs[name] = np.where(shared, np.array([[1], [1], [-1]]), rng.choice([-1, 1], size=(3, n)))
    paths = [save(model, "llama", root / "base")]
    for k in range(3):
        deltas = {
            name: (masks[name][k] * signs[name][k] * STEP).reshape(tuple(state[name].shape)) for name in state
        }
        paths.append(_write(model, state, deltas, root / f"run{k}"))
    return paths, masks, signs


def _hyper(a: int, b: int, n: int) -> tuple[float, float]:
    return a * b / n, a * b * (n - a) * (n - b) / (n * n * (n - 1))


def expected_overlap(masks: dict, signs: dict, names, runs: int) -> dict:
    """Every overlap statistic from the planted masks in float64 NumPy."""
    pairs = [(a, b) for a in range(runs) for b in range(a + 1, runs)]
    per = {}
    for name in names:
        m, s = masks[name][:runs], signs[name][:runs]
        n = m.shape[1]
        per[name] = {
            "numel": n,
            "changed": m.sum(1).tolist(),
            "pairs": [
                {
                    "both": int((m[a] & m[b]).sum()),
                    "same": int((m[a] & m[b] & (s[a] == s[b])).sum()),
                    **dict(zip(("mean", "var"), _hyper(int(m[a].sum()), int(m[b].sum()), n))),
                }
                for a, b in pairs
            ],
        }
    code = np.concatenate([(masks[k][:runs] * (1 << np.arange(runs))[:, None]).sum(0) for k in names])
    upset = [
        (int((code == c).sum()), int(((code & c) == c).sum())) for c in range(1, 1 << runs)
    ]  # exact, inclusive
    return {"per": per, "pairs": pairs, "upset": upset}


def _sum_pairs(per: dict, names, i: int) -> tuple[int, float, float, int]:
    rows = [per[k]["pairs"][i] for k in names]
    return (
        sum(r["both"] for r in rows),
        math.fsum(r["mean"] for r in rows),
        math.fsum(r["var"] for r in rows),
        sum(r["same"] for r in rows),
    )


def _check_pair(got: dict, both: int, mean: float, var: float, same: int) -> None:
    assert got["both"] == both and got["same_sign"] == same and got["opposite_sign"] == both - same
    assert got["baseline"] == pytest.approx(mean, rel=1e-12)
    assert got["lift"] == pytest.approx(both / mean, rel=1e-12)
    assert got["z"] == pytest.approx((both - mean) / math.sqrt(var), rel=1e-9)
    assert got["sign_agreement"] == pytest.approx(same / both, rel=1e-12)


def _check_masks(paths, masks, runs):
    """The stored checkpoints hold exactly the planted masks (read back by safetensors)."""
    b = ref.load(paths[0])
    for k in range(runs):
        t = ref.load(paths[k + 1])
        for name in b:
            np.testing.assert_array_equal(np.abs(t[name] - b[name]).ravel() > TAU, masks[name][k], name)


@pytest.mark.parametrize("runs", [2, 3])
def test_overlap_statistics_match_numpy(planted_overlap, runs):
    paths, masks, signs = planted_overlap
    _check_masks(paths, masks, runs)
    doc = run_analysis(
        "overlap", [str(p) for p in paths[: runs + 1]], Options(taus=[TAU], device="cpu")
    ).document
    names = [t["name"] for t in doc["tensors"]]
    assert sorted(names) == sorted(masks)
    e = expected_overlap(masks, signs, names, runs)
    for t in doc["tensors"]:  # per tensor: hypergeometric baseline and z of that tensor alone
        for got, exp in zip(t["pairs"], e["per"][t["name"]]["pairs"]):
            if exp["var"] > 0 and exp["both"]:
                _check_pair(got, exp["both"], exp["mean"], exp["var"], exp["same"])
    s, numel = doc["summary"], sum(e["per"][k]["numel"] for k in names)
    totals = [sum(e["per"][k]["changed"][r] for k in names) for r in range(runs)]
    assert s["changed"] == totals
    for i, (a, b) in enumerate(e["pairs"]):
        both, mean, var, same = _sum_pairs(e["per"], names, i)
        got = s["pairs"][i]
        assert (got["a"], got["b"]) == (a, b)
        _check_pair(got, both, mean, var, same)
        assert got["variance"] == pytest.approx(var, rel=1e-12)
        glob = totals[a] * totals[b] / numel  # the baseline of the totals, reported next to it
        assert got["baseline_global"] == pytest.approx(glob, rel=1e-12)
        assert got["lift_global"] == pytest.approx(both / glob, rel=1e-12)
        assert abs(got["baseline"] - glob) > 0.01 * glob  # densities differ by tensor: they differ
        # the planted shared mask: far above chance; A, B agree on it in sign, C opposes them
        assert got["lift"] > 1.3 and got["z"] > 10
        assert (got["sign_agreement"] > 0.6) if b < 2 else (got["sign_agreement"] < 0.4)
    assert [(u["exact"], u["inclusive"]) for u in s["upset"]] == e["upset"]
    assert [u["region"] for u in s["upset"]] == [
        "".join(str(c >> k & 1) for k in range(runs)) for c in range(1, 1 << runs)
    ]
    assert sum(u["exact"] for u in s["upset"]) == int(
        np.logical_or.reduce(np.concatenate([masks[k][:runs] for k in names], 1)).sum()
    )
    for key in ("matrix", "layer"):  # pair figures per matrix type and per layer: the tensors' sums
        groups = s[f"by_{key}"]
        values = [g[key] for g in groups]
        assert (
            sorted(values, key=lambda v: (MATRIX_TYPES.index(v),) if key == "matrix" else (v is None, v or 0))
            == values
        )
        for g in groups:
            members = [t["name"] for t in doc["tensors"] if t[key] == g[key]]
            assert g["numel"] == sum(e["per"][k]["numel"] for k in members)
            for i, got in enumerate(g["pairs"]):
                both, mean, var, same = _sum_pairs(e["per"], members, i)
                if var > 0 and both:
                    _check_pair(got, both, mean, var, same)
    q = next(g for g in s["by_matrix"] if g["matrix"] == "q")
    down = next(g for g in s["by_matrix"] if g["matrix"] == "down")
    assert q["pairs"][0]["lift"] > 2 * down["pairs"][0]["lift"]  # S is planted densest in q


# ---------------------------------------------------------------------------------------------
# series
# ---------------------------------------------------------------------------------------------
# planted sets: which of the 4 checkpoints differ from the base (1) — first change and fate known
SCHEDULES = {
    "K": (1, 1, 1, 1),  # first at step 1, kept
    "P": (1, 0, 0, 0),  # first at step 1, reverted
    "Q": (1, 0, 0, 1),  # first at step 1, reverted at 2, changed again at the end: kept
    "R": (0, 1, 0, 0),  # first at step 2, reverted at step 3
    "L": (0, 0, 1, 1),  # first at step 3, kept
    "F": (0, 0, 0, 1),  # only the final checkpoint
}


def _shares(name: str) -> dict:
    """R is planted densest in layer 1's MLP: the transient heatmap must show it there."""
    hot = "layers.1.mlp" in name
    return {"K": 0.1, "P": 0.03, "Q": 0.04, "R": 0.3 if hot else 0.05, "L": 0.08, "F": 0.06}


@pytest.fixture(scope="module")
def planted_series(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    model, state = _state()
    rng = np.random.default_rng(9)
    sets = {}  # name -> (n,) index of the planted set (-1: untouched)
    for name, v in state.items():
        u, label, edge = rng.random(v.numel()), np.full(v.numel(), -1), 0.0
        for i, share in enumerate(_shares(name).values()):
            label[(u >= edge) & (u < edge + share)] = i
            edge += share
        sets[name] = label
    schedule = np.array(list(SCHEDULES.values()) + [(0, 0, 0, 0)])  # row -1: untouched
    paths = [save(model, "llama", root / "base")]
    for step in range(4):
        deltas = {
            name: (
                schedule[sets[name], step] * rng.choice([-1, 1], size=sets[name].size) * STEP * (step + 1)
            ).reshape(tuple(state[name].shape))
            for name in state
        }
        paths.append(_write(model, state, deltas, root / f"step{step + 1}"))
    return paths, sets


def expected_series(paths) -> dict:
    """First change, kept / reverted, transient per tensor and ‖Δ‖ per step, from the checkpoints."""
    b = ref.load(paths[0])
    ts = [ref.load(p) for p in paths[1:]]
    out = {}
    for name in b:
        m = np.stack([np.abs(t[name] - b[name]).ravel() > TAU for t in ts])
        ever = m.any(0)
        first = np.where(ever, m.argmax(0), len(ts))
        kept = m[-1]
        out[name] = {
            "first": [int((first == k).sum()) for k in range(len(ts))],
            "kept": [int(((first == k) & kept).sum()) for k in range(len(ts))],
            "reverted": [int(((first == k) & ~kept).sum()) for k in range(len(ts))],
            "transient": int((ever & ~kept).sum()),
            "sq": [float(((t[name] - b[name]) ** 2).sum()) for t in ts],
            "numel": int(m.shape[1]),
        }
    return out


def test_series_first_change_kept_reverted_match_numpy(planted_series):
    paths, sets = planted_series
    doc = run_analysis("series", [str(p) for p in paths], Options(taus=[TAU], device="cpu")).document
    e = expected_series(paths)
    names = list(e)
    # by construction: first change per step and its fate, from the planted sets' sizes
    size = {k: sum(int((sets[n] == i).sum()) for n in names) for i, k in enumerate(SCHEDULES)}
    planted = {
        "first_changed": [size["K"] + size["P"] + size["Q"], size["R"], size["L"], size["F"]],
        "kept": [size["K"] + size["Q"], 0, size["L"], size["F"]],
        "reverted": [size["P"], size["R"], 0, 0],
    }
    for key, values in planted.items():
        assert [s[key] for s in doc["steps"]] == values, key
    assert sum(s["kept"] for s in doc["steps"]) == doc["categories"]["consistent"]
    assert sum(s["reverted"] for s in doc["steps"]) == doc["categories"]["transient"]
    for i, s in enumerate(doc["steps"]):
        assert s["norm_delta"] == pytest.approx(math.sqrt(math.fsum(e[n]["sq"][i] for n in names)), rel=1e-12)
        assert s["relative_l2"] * math.sqrt(math.fsum((v**2).sum() for v in ref.load(paths[0]).values())) == (
            pytest.approx(s["norm_delta"], rel=1e-9)
        )
    for t in doc["tensors"]:
        exp = e[t["name"]]
        assert [s["first_changed"] for s in t["steps"]] == exp["first"], t["name"]
        assert [s["kept"] for s in t["steps"]] == exp["kept"]
        assert [s["reverted"] for s in t["steps"]] == exp["reverted"]
        assert [s["norm_delta"] for s in t["steps"]] == pytest.approx(
            [math.sqrt(x) for x in exp["sq"]], rel=1e-12
        )
    heat = doc["transient_heatmap"]
    cells: dict = {}
    for t in doc["tensors"]:
        c = cells.setdefault((t["layer"], t["matrix"]), [0, 0])
        c[0] += e[t["name"]]["transient"]
        c[1] += e[t["name"]]["numel"]
    for i, layer in enumerate(heat["layers"]):
        for j, m in enumerate(heat["matrices"]):
            c = cells.get((layer, m))
            assert heat["transient"][i][j] == (c[0] if c else None)
            assert heat["share"][i][j] == (pytest.approx(c[0] / c[1], rel=1e-12) if c else None)
    share = {
        (la, m): heat["share"][i][j]
        for i, la in enumerate(heat["layers"])
        for j, m in enumerate(heat["matrices"])
    }
    assert share[(1, "up")] > 0.3 > 0.1 > share[(0, "up")]  # R planted in layer 1's MLP


# ---------------------------------------------------------------------------------------------
# the CLI's JSON and DuckDB rows
# ---------------------------------------------------------------------------------------------
def test_cli_json_and_duckdb_rows(tmp_path, planted_overlap, planted_series):
    paths, masks, signs = planted_overlap
    out = tmp_path / "r.duckdb"
    proc = run_cli("overlap", *paths, "--json", "-", "--out", out, "--quiet", check=True)
    doc = json.loads(proc.stdout)
    engine = run_analysis("overlap", [str(p) for p in paths], Options(taus=[TAU], device="cpu")).document
    assert doc["summary"] == engine["summary"]
    series = run_analysis("series", [str(p) for p in planted_series[0]], Options(taus=[TAU], device="cpu"))
    write_artifact(series, out)  # the store the CLI's --out uses, without a second process
    series_doc = series.document
    with duckdb.connect(str(out), read_only=True) as con:
        (oid,) = con.execute("SELECT analysis_id FROM analyses WHERE kind = 'overlap'").fetchone()
        (sid,) = con.execute("SELECT analysis_id FROM analyses WHERE kind = 'series'").fetchone()
        rows = con.execute(
            "SELECT a, b, both_count, baseline, variance, lift, z, same_sign, baseline_global "
            "FROM overlap_stats WHERE analysis_id = ? AND name = '*' ORDER BY a, b",
            [oid],
        ).fetchall()
        assert [
            (
                p["a"],
                p["b"],
                p["both"],
                p["baseline"],
                p["variance"],
                p["lift"],
                p["z"],
                p["same_sign"],
                p["baseline_global"],
            )
            for p in doc["summary"]["pairs"]
        ] == rows
        per_tensor = con.execute(
            "SELECT count(*) FROM overlap_stats WHERE analysis_id = ? AND name <> '*'", [oid]
        ).fetchone()[0]
        assert per_tensor == 3 * len(doc["tensors"])
        upset = con.execute(
            "SELECT region, degree, exact, inclusive FROM upset WHERE analysis_id = ? ORDER BY region", [oid]
        ).fetchall()
        assert (
            sorted((u["region"], len(u["runs"]), u["exact"], u["inclusive"]) for u in doc["summary"]["upset"])
            == upset
        )
        assert len(upset) == 7
        first = con.execute(
            "SELECT first_changed, kept, reverted, norm_delta FROM series_first_change "
            "WHERE analysis_id = ? AND name = '*' ORDER BY step",
            [sid],
        ).fetchall()
        assert first == [
            (s["first_changed"], s["kept"], s["reverted"], s["norm_delta"]) for s in series_doc["steps"]
        ]
        assert con.execute(
            "SELECT count(*) FROM series_first_change WHERE analysis_id = ? AND name <> '*'", [sid]
        ).fetchone()[0] == 4 * len(series_doc["tensors"])


# ---------------------------------------------------------------------------------------------
# the API's views and the dashboard
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory, planted_overlap, planted_series):
    from service import Api, Worker, running, service_env

    root = tmp_path_factory.mktemp("site")
    (root / "results").mkdir()
    roots = [planted_overlap[0][0].parent, planted_series[0][0].parent]
    env = service_env(root / "data", "filesystem://", f"file://{root / 'results'}", "ostats", roots)
    with running(Worker(env, root / "worker.log"), Api(env, root / "api.log")) as (_, api):
        yield api.url


def _submit(client, kind: str, paths) -> str:
    from service import wait_done

    ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in paths]
    aid = client.post("/api/analyses", json={"kind": kind, "checkpoints": ids}).json()["id"]
    assert wait_done(client, aid)["status"] == "done"
    return aid


def test_api_views_and_dashboard(site, planted_overlap, planted_series):
    import httpx
    from test_dashboard import ARGS, CHROMIUM, new_page, shot

    playwright = pytest.importorskip("playwright.sync_api")
    client = httpx.Client(base_url=site, timeout=30)
    paths, masks, signs = planted_overlap
    oid, sid = _submit(client, "overlap", paths), _submit(client, "series", planted_series[0])
    doc = client.get(f"/api/analyses/{oid}/result").json()
    view = client.get(f"/api/analyses/{oid}/overlap").json()
    s = doc["summary"]
    keys = ("a", "b", "both", "baseline", "lift", "z", "same_sign", "opposite_sign", "baseline_global")
    for got, exp in zip(view["summary"]["pairs"], s["pairs"]):
        for k in keys:
            assert got[k] == pytest.approx(exp[k], rel=1e-12), k
    assert view["summary"]["upset"] == s["upset"]
    for key in ("by_matrix", "by_layer"):  # summed in SQL from the per-tensor rows: the engine's sums
        assert len(view["summary"][key]) == len(s[key])
        for got, exp in zip(view["summary"][key], s[key]):
            assert (got["numel"], got["changed"]) == (exp["numel"], exp["changed"])
            for gp, ep in zip(got["pairs"], exp["pairs"]):
                assert (gp["both"], gp["same_sign"]) == (ep["both"], ep["same_sign"])
                assert gp["baseline"] == pytest.approx(ep["baseline"], rel=1e-12)
                assert gp["z"] == pytest.approx(ep["z"], rel=1e-9)
    sdoc = client.get(f"/api/analyses/{sid}/result").json()
    sview = client.get(f"/api/analyses/{sid}/series").json()
    for got, exp in zip(sview["steps"], sdoc["steps"]):
        assert {k: got[k] for k in ("first_changed", "kept", "reverted")} == {
            k: exp[k] for k in ("first_changed", "kept", "reverted")
        }
        assert got["norm_delta"] == pytest.approx(exp["norm_delta"], rel=1e-12)
    assert sview["transient_heatmap"] == sdoc["transient_heatmap"]

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context, page = new_page(browser)
        page.goto(f"{site}/analyses/{oid}/overlap")
        page.locator("#upset .main-svg").first.wait_for()
        bars = page.locator("#upset .barlayer .point")
        assert bars.count() == sum(1 for u in s["upset"] if u["exact"])  # 7 non-empty sets of 3 runs
        shot(page, "overlap-upset")
        bars.first.scroll_into_view_if_needed()
        box = bars.first.bounding_box()  # the largest set: its exact and inclusive counts in the hover
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.locator("#upset .hoverlayer .hovertext").first.wait_for(timeout=10_000)
        hover = page.locator("#upset .hoverlayer .hovertext").first.text_content()
        top = max(s["upset"], key=lambda u: u["exact"])
        assert f"{top['exact']:,}" in hover and f"{top['inclusive']:,}" in hover, hover
        cells = page.locator("#overlap-pairs tbody tr").first.locator("td").all_inner_texts()
        assert cells[7] == f"{s['pairs'][0]['lift']:.2f}" and cells[8] == f"{s['pairs'][0]['z']:.1f}"
        assert page.locator("#upset .caption").count() == 1
        page.goto(f"{site}/analyses/{sid}/series")
        for panel in ("#first-change", "#norm-delta", "#transient-heatmap"):
            page.locator(f"{panel} .main-svg").first.wait_for()
            assert page.locator(f"{panel} .caption").count() == 1
        assert page.locator("#first-change .barlayer .point").count() == 2 * len(
            sdoc["steps"]
        )  # kept and reverted per step, zero bars too
        shot(page, "series-first-change")
        assert not page.errors, page.errors
        context.close()
        browser.close()
