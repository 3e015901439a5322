"""Principal geometry of ΔW against W₀ and where the update mask falls (worker.geometry), against an
independent float64 NumPy computation (np.linalg.svd, a stable sort for the top-p selections) on
checkpoints whose answer is known by construction."""

from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.numpy import save_file

from deltalens.backend import results
from deltalens.backend.catalog import Catalog
from deltalens.backend.models import GeometryView, TensorDetail
from deltalens.worker import geometry as G
from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.store import write_artifact

M, N = 48, 40  # geometry matrices: ks = 1, 8, 32; W₀'s column space leaves 8 directions free
TAU = 1e-5


def _orthonormal(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


def _name(layer: int, m: str) -> str:
    return f"model.layers.{layer}.self_attn.{m}_proj.weight"


def planted() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (W₀, W₁), float64 (stored as F64, so ΔW is exact up to 1e-16 of W₀)."""
    rng = np.random.default_rng(0)
    u, v = _orthonormal(rng, M), _orthonormal(rng, N)
    sigma = np.geomspace(10, 0.1, N)  # distinct, every ratio 1.125: well-defined subspaces
    w0 = (u[:, :N] * sigma) @ v.T
    c = rng.standard_normal((8, 8))
    drift = sigma.copy()
    drift[3] *= 1.05
    e0 = rng.standard_normal((50, 40))  # 2000 weights: 1 % = 20, 10 % = 200
    top = np.argsort(-np.abs(e0).ravel(), kind="stable")[:20]
    hit = np.zeros(e0.size)
    hit[top] = 0.1
    q0 = np.round(rng.standard_normal((50, 40)) * 4) / 4  # many ties at every threshold
    return {
        _name(0, "q"): (w0, w0 + 1e-2 * u[:, :8] @ c @ v[:, :8].T),  # inside the top 8
        _name(0, "k"): (w0, w0 + 1e-2 * u[:, 32:40] @ c @ v[:, 32:40].T),  # outside the top 32
        _name(0, "v"): (w0, w0 + 1e-2 * np.outer(rng.standard_normal(M), rng.standard_normal(N))),
        _name(0, "o"): (w0, w0 + 30 * np.outer(u[:, 45], v[:, 0])),  # an intruder on top
        _name(1, "q"): (w0, (u[:, :N] * drift) @ v.T),
        _name(1, "k"): (e0, e0 + hit.reshape(e0.shape)),  # the mask = the top 1 % of |W₀|
        _name(1, "v"): (e0, e0 + 0.1 * (rng.random(e0.shape) < 0.3)),  # a random mask
        _name(1, "o"): (w0, w0.copy()),  # ΔW = 0
        _name(2, "q"): (q0, q0 + 0.1 * (rng.random(q0.shape) < 0.2)),
        "model.norm.weight": (np.ones(N), np.ones(N) + 0.5),
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry")
    weights = planted()
    for i, side in enumerate(("base", "target")):
        save_file({k: np.ascontiguousarray(w[i]) for k, w in weights.items()}, root / f"{side}.safetensors")
    return root / "base.safetensors", root / "target.safetensors", weights


# --- the independent reference ---------------------------------------------------------------
def _top_mask(values: np.ndarray, percent: int) -> np.ndarray:
    k = math.ceil(values.size * percent / 100)
    out = np.zeros(values.size, bool)
    out[np.argsort(-values.ravel(), kind="stable")[:k]] = True  # ties: lowest index first
    return out


def reference(b: np.ndarray, t: np.ndarray, tau: float, relative: bool) -> dict:
    d = t - b
    r = min(b.shape)
    ks = sorted({min(k, r) for k in (1, 8, 32)})
    u0, s0, v0h = np.linalg.svd(b, full_matrices=False)
    u1, s1, v1h = np.linalg.svd(t, full_matrices=False)
    v0, v1 = v0h.T, v1h.T
    sq = (d**2).sum()
    share = lambda f: [f(k) / sq for k in ks] if sq else None  # noqa: E731
    cos = lambda a, c, k: np.linalg.svd(a[:, :k].T @ c[:, :k], compute_uv=False).clip(0, 1)  # noqa: E731
    mask = (np.abs(d) > tau * np.abs(b)) if relative else (np.abs(d) > tau)

    def enrich(values):
        out = []
        for p in (1, 10):
            sel = _top_mask(values, p)
            observed = int((mask.ravel() & sel).sum())
            expected = mask.sum() * sel.sum() / mask.size
            out.append(dict(percent=p, selected=int(sel.sum()), observed=observed, expected=expected))
        return out

    kp = min(8, r)
    return dict(
        k=ks,
        energy_in_topk=share(lambda k: ((u0[:, :k].T @ d @ v0[:, :k]) ** 2).sum()),
        left_in_topk=share(lambda k: ((u0[:, :k].T @ d) ** 2).sum()),
        right_in_topk=share(lambda k: ((d @ v0[:, :k]) ** 2).sum()),
        left_max_deg=[math.degrees(math.acos(cos(u0, u1, k).min())) for k in ks],
        left_mean_cos2=[(cos(u0, u1, k) ** 2).mean() for k in ks],
        right_max_deg=[math.degrees(math.acos(cos(v0, v1, k).min())) for k in ks],
        drift=(s1[: ks[-1]] / s0[: ks[-1]]).tolist(),
        rank1_dominance=np.linalg.svd(d, compute_uv=False)[0] ** 2 / sq if sq else None,
        intruders=[
            np.flatnonzero(np.abs(u1[:, :k].T @ u0[:, : min(2 * k, r)]).max(1) <= 0.5).tolist() for k in ks
        ],
        changed=int(mask.sum()),
        magnitude=enrich(np.abs(b)),
        principal=enrich(np.abs((u0[:, :kp] * s0[:kp]) @ v0[:, :kp].T)),
    )


def check(g: dict, ref: dict) -> None:
    """The engine's figures equal the reference's: floats to 1e-9, counts and indices exactly."""
    close = lambda a, b, tol=1e-9: a == b if a is None or b is None else a == pytest.approx(b, abs=tol)  # noqa: E731
    assert g["k"] == ref["k"]
    for key in ("energy_in_topk", "left_in_topk", "right_in_topk", "drift", "rank1_dominance"):
        assert close(g[key], ref[key]), key
    for key in ("left_max_deg", "right_max_deg"):
        assert close(g["angles"][key], ref[key], 1e-4), key  # acos near 1: 1e-16 in cos ~ 1e-6°
    assert close(g["angles"]["left_mean_cos2"], ref["left_mean_cos2"])
    assert g["intruders"]["indices"] == ref["intruders"]
    assert g["intruders"]["count"] == [len(i) for i in ref["intruders"]]
    e = g["enrichment"]
    assert e["changed"] == ref["changed"]
    for sel in ("magnitude", "principal"):
        for got, want in zip(e[sel], ref[sel], strict=True):
            assert {k: got[k] for k in ("percent", "selected", "observed")} == {
                k: want[k] for k in ("percent", "selected", "observed")
            }
            assert got["expected"] == pytest.approx(want["expected"], rel=1e-12)


# --- the engine through run_analysis ---------------------------------------------------------
@pytest.fixture(scope="module", params=[True, False], ids=["fused", "torch"])
def analysed(request, pair):
    base, target, _ = pair
    opts = Options(taus=[TAU, 1e-3], device="cpu", fused=request.param, chunk_elements=300)
    return run_analysis("pair", [str(base), str(target)], opts)


def test_every_matrix_against_numpy(pair, analysed):
    weights = pair[2]
    rows = {t["name"]: t for t in analysed.document["tensors"]}
    assert rows["model.norm.weight"]["geometry"] is None  # vectors have no subspaces
    for name, (b, t) in weights.items():
        if b.ndim == 2:
            check(rows[name]["geometry"], reference(b, t, TAU, False))
            assert rows[name]["geometry"]["enrichment"]["changed"] == rows[name]["changed"][0]["count"]


def test_known_by_construction(analysed):
    g = {t["name"]: t["geometry"] for t in analysed.document["tensors"]}
    inside, outside, rank1, intruder = (g[_name(0, m)] for m in "qkvo")
    assert inside["k"] == [1, 8, 32] and inside["method"] == "exact"
    for key in ("energy_in_topk", "left_in_topk", "right_in_topk"):
        assert inside[key][1:] == pytest.approx([1, 1], abs=1e-10)
        assert inside[key][0] < 0.9
        assert outside[key] == pytest.approx([0, 0, 0], abs=1e-12)
    assert rank1["rank1_dominance"] == pytest.approx(1, abs=1e-12)
    assert inside["rank1_dominance"] < 0.9
    assert intruder["intruders"]["indices"] == [[0], [0], [0]]
    assert inside["intruders"]["count"] == [0, 0, 0]
    drift = g[_name(1, "q")]["drift"]
    assert drift[3] == pytest.approx(1.05, abs=1e-12)
    assert drift[:3] + drift[4:] == pytest.approx([1] * 31, abs=1e-12)
    masked = g[_name(1, "k")]["enrichment"]
    assert masked["changed"] == 20
    assert [(s["selected"], s["observed"], s["ratio"]) for s in masked["magnitude"]] == [
        (20, 20, 100.0),
        (200, 20, 10.0),
    ]
    assert 0.7 < g[_name(1, "v")]["enrichment"]["magnitude"][1]["ratio"] < 1.3
    zero = g[_name(1, "o")]
    assert zero["energy_in_topk"] is zero["rank1_dominance"] is None
    assert zero["enrichment"]["changed"] == 0 and zero["enrichment"]["magnitude"][0]["ratio"] is None
    assert zero["drift"] == pytest.approx([1] * 32, abs=1e-12)
    summary = analysed.document["summary"]["geometry"]
    assert summary["model"]["matrices"] == 9
    assert [m["matrix"] for m in summary["by_matrix"]] == ["q", "k", "v", "o"]


def test_relative_mask_is_the_counts_rule(pair):
    base, target, weights = pair
    result = run_analysis(
        "pair", [str(base), str(target)], Options(taus=[0.05], relative=True, device="cpu", fused=True)
    )
    for t in result.document["tensors"]:
        if t["geometry"]:
            b, w = weights[t["name"]]
            check(t["geometry"], reference(b, w, 0.05, True))
            assert t["geometry"]["enrichment"]["changed"] == t["changed"][0]["count"]


def test_randomized_svd_matches_numpy_on_a_gapped_spectrum(monkeypatch):
    monkeypatch.setattr(G, "EXACT_MAX", 100)  # the randomized route on a small matrix
    rng = np.random.default_rng(1)
    m, n = 200, 150
    u, v = _orthonormal(rng, m)[:, :n], _orthonormal(rng, n)
    sigma = np.concatenate([np.geomspace(100, 10, 64), np.geomspace(1, 0.01, n - 64)])  # gap after 64
    w0 = (u * sigma) @ v.T
    w1 = w0 + 0.3 * np.outer(u[:, 2], v[:, 5]) + 1e-3 * rng.standard_normal((m, n))
    uq, s, vq, method = G.top_svd(torch.from_numpy(w0), 64)
    assert method == "randomized"
    assert s.numpy() == pytest.approx(sigma[:64], rel=1e-12)
    cos = np.linalg.svd(uq.numpy().T @ u[:, :64], compute_uv=False)  # same 64-dimensional subspace
    assert cos.min() == pytest.approx(1, abs=1e-10)
    g = G.geometry(torch.from_numpy(w0), torch.from_numpy(w1), 1e-3, False)
    ref = reference(w0, w1, 1e-3, False)
    assert g["method"] == "randomized"
    for key in ("energy_in_topk", "left_in_topk", "right_in_topk"):
        assert g[key] == pytest.approx(ref[key], abs=1e-8), key
    assert g["rank1_dominance"] == pytest.approx(ref["rank1_dominance"], rel=1e-8)
    assert g["drift"] == pytest.approx(ref["drift"], rel=1e-10)
    assert g["enrichment"]["changed"] == ref["changed"]
    assert [s["observed"] for s in g["enrichment"]["magnitude"]] == [s["observed"] for s in ref["magnitude"]]


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_randomized_route_is_float64_accurate_for_a_generic_update(monkeypatch, wide):
    """ΔW in every direction (energy shares move to first order with any error in W₀'s subspaces):
    the float32 steps of the iteration leave no trace after its float64 step and Rayleigh–Ritz."""
    monkeypatch.setattr(G, "EXACT_MAX", 100)
    rng = np.random.default_rng(2)
    m, n = 200, 150
    u, v = _orthonormal(rng, m)[:, :n], _orthonormal(rng, n)
    sigma = np.concatenate([np.geomspace(100, 10, 64), np.geomspace(1, 0.01, n - 64)])
    w0 = (u * sigma) @ v.T
    w1 = w0 + 1e-2 * rng.standard_normal((m, n))
    w0, w1 = (np.ascontiguousarray(w.T) for w in (w0, w1)) if wide else (w0, w1)
    sigma1 = np.linalg.svd(w1 - w0, compute_uv=False)[0]  # σ₁(ΔW) from the rank, as the pass gives it
    g, ref = G.geometry(w0, w1, 1e-3, False, sigma1), reference(w0, w1, 1e-3, False)
    assert g["method"] == "randomized"
    check(g, ref)
    for key in ("energy_in_topk", "left_in_topk", "right_in_topk"):
        assert g[key] == pytest.approx(ref[key], abs=1e-12), key
    assert g["drift"] == pytest.approx(ref["drift"], rel=1e-12)


@pytest.mark.parametrize("scale", [1e20, 1e-24, 2.0**-130], ids=["huge", "tiny", "subnormal-f32"])
def test_randomized_route_does_not_depend_on_the_weights_scale(monkeypatch, scale):
    """The float32 steps see the matrix scaled by a power of two: weights far outside float32's
    comfortable range give the figures of the unscaled matrix (no overflow to NaN, no underflow)."""
    monkeypatch.setattr(G, "EXACT_MAX", 100)
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((200, 150)) * np.geomspace(1, 0.01, 150)
    w1 = w0 + 1e-3 * rng.standard_normal((200, 150))
    ref = G.geometry(w0.copy(), w1.copy(), 1e-4, False)
    g = G.geometry(w0 * scale, w1 * scale, 1e-4 * scale, False)
    assert g["method"] == ref["method"] == "randomized"
    for key in ("energy_in_topk", "left_in_topk", "right_in_topk", "drift"):
        assert g[key] == pytest.approx(ref[key], rel=1e-9), key
    assert g["angles"]["left_max_deg"] == pytest.approx(ref["angles"]["left_max_deg"], abs=1e-6)


def test_top_selections_exact_where_the_sample_misleads():
    """The top-p % selections equal a stable sort's, ties in row-major order, also when the strided
    sample sees only large values (fewer candidates than K: all values are searched) or none."""
    n = 12 * G.SAMPLE
    stride = n // G.SAMPLE
    at = np.arange(n)
    cases = {
        "sample sees large only": np.where(at % (2 * stride) == 0, 5.0, 1.0),
        "sample sees small only": np.where(at % stride == 0, 0.0, np.round(at % 7 * 0.5, 1)),
        "ties everywhere": np.round(np.random.default_rng(3).random(n) * 8) / 8,
    }
    for name, values in cases.items():
        for (selected, k), p in zip(G._selections(values), G.PERCENTS, strict=True):
            assert k == -(-n * p // 100), name
            assert np.array_equal(np.sort(selected), np.flatnonzero(_top_mask(values, p))), (name, p)


# --- CLI, DuckDB, API ---------------------------------------------------------------------------
def test_cli_json_and_no_geometry(pair, tmp_path):
    base, target, weights = pair
    out = tmp_path / "r.duckdb"
    proc = run_cli("analyze", base, target, "--json", "-", "--quiet", "--out", out, check=True)
    doc = json.loads(proc.stdout)
    g = {t["name"]: t["geometry"] for t in doc["tensors"]}
    check(g[_name(0, "o")], reference(*weights[_name(0, "o")], TAU, False))
    with duckdb.connect(str(out), read_only=True) as con:
        rows = con.execute("SELECT name, k, rank1_dominance, intruders, figures FROM geometry").fetchall()
        enrich = con.execute(
            "SELECT name, selector, percent, selected, observed, expected FROM enrichment"
        ).fetchall()
    assert {r[0] for r in rows} == {n for n, v in g.items() if v}
    for name, k, dominance, intruders, figures in rows:
        assert (k, dominance, intruders, json.loads(figures)) == (
            g[name]["k"],
            g[name]["rank1_dominance"],
            g[name]["intruders"]["count"],
            g[name],
        )
    assert len(enrich) == 9 * 4
    for name, selector, percent, selected, observed, expected in enrich:
        s = next(x for x in g[name]["enrichment"][selector] if x["percent"] == percent)
        assert (selected, observed, expected) == (s["selected"], s["observed"], s["expected"])
    proc = run_cli(
        "analyze", base, target, "--json", "-", "--quiet", "--no-geometry", "--no-rank", check=True
    )
    doc = json.loads(proc.stdout)
    assert all(t["geometry"] is None for t in doc["tensors"]) and doc["summary"]["geometry"] is None


def test_api_geometry_grid_and_detail(pair, analysed, tmp_path):
    write_artifact(analysed, tmp_path / "a.duckdb", "g1")
    catalog = Catalog(tmp_path / "catalog.duckdb")
    try:
        catalog.add_job("g1", "pair", ["b", "t"], [TAU], False, True)
        catalog.ingest("g1", tmp_path / "a.duckdb")
        view = GeometryView(**results.geometry(catalog, "g1")).model_dump()
        assert view["layers"] == [0, 1, 2] and view["matrices"] == ["q", "k", "v", "o"]
        rows = {t["name"]: t for t in analysed.document["tensors"]}
        energy = rows[_name(0, "q")]["geometry"]["energy_in_topk"][1]
        assert view["energy_in_top8"][0][0] == pytest.approx(energy, rel=1e-12)
        assert view["rank1_dominance"][0][2] == pytest.approx(1, abs=1e-12)
        assert view["energy_in_top8"][1][3] is None  # ΔW = 0: no energy to share
        assert view["count"][2] == [1, None, None, None]
        magnitude1 = next(e for e in view["enrichment"] if e["selector"] == "magnitude" and e["percent"] == 1)
        assert magnitude1["ratio"][1][1] == 100.0
        detail = TensorDetail.model_validate_json(results.tensor_detail(catalog, "g1", _name(0, "o")))
        assert detail.geometry.model_dump() == rows[_name(0, "o")]["geometry"] | {"skipped": None}
        norm = json.loads(results.tensor_detail(catalog, "g1", "model.norm.weight"))
        assert norm["geometry"] is None
    finally:
        catalog.close()
