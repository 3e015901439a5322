"""pair: every count, histogram, magnitude, rank and update map against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import config_of

from deltalens.worker.analyses import Options, run_analysis

TAUS = [0.0, 1e-6, 1e-5, 3e-4, 1e-2]
FAMILIES = ["llama", "gpt2", "qwen2", "neox", "phi3"]


def expected_parts(base, target):
    config = config_of(base)
    b, t = ref.load(base), ref.load(target)
    out = {}
    for name in b:
        bp, tp = ref.split_parts(name, b[name], config), ref.split_parts(name, t[name], config)
        out.update({k: (bp[k], tp[k], name) for k in bp})
    return out


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_counts_and_histograms_match_numpy(family_pair, kind, relative, fused):
    base, target = family_pair(kind)
    # small chunks, so every matrix is cut into several row chunks
    result = run_analysis(
        "pair",
        [str(base), str(target)],
        Options(taus=TAUS, relative=relative, device="cpu", fused=fused, chunk_elements=500),
    )
    parts = expected_parts(base, target)
    details = {d["name"]: d for d in result.details}
    assert set(details) == set(parts)
    total = np.zeros(len(TAUS), dtype=np.int64)
    for name, (b, t, _) in parts.items():
        d = details[name]
        exp_abs = [ref.changed(b, t, tau) for tau in TAUS]
        exp_rel = [ref.changed(b, t, tau, relative=True) for tau in TAUS]
        assert d["changed_abs"] == exp_abs, name
        assert d["changed_rel"] == exp_rel, name
        assert [c["count"] for c in d["row"]["changed"]] == (exp_rel if relative else exp_abs)
        assert d["hist_abs"] == ref.histogram(np.abs(t - b)), name
        assert d["hist_rel"] == ref.histogram(ref.relative_values(b, t)), name
        assert d["row"]["numel"] == b.size
        assert d["norm_delta"] == pytest.approx(np.linalg.norm(t - b), rel=1e-9, abs=1e-300)
        assert d["norm_base"] == pytest.approx(np.linalg.norm(b), rel=1e-9)
        assert d["max_abs_delta"] == np.abs(t - b).max()
        total += exp_rel if relative else exp_abs
    summary = result.document["summary"]
    assert [c["count"] for c in summary["changed"]] == total.tolist()
    assert summary["numel"] == sum(b.size for b, _, _ in parts.values())


@pytest.mark.parametrize("kind", FAMILIES)
def test_rank_and_spectrum_match_svd(family_pair, kind):
    base, target = family_pair(kind)
    result = run_analysis("pair", [str(base), str(target)], Options(device="cpu"))
    parts = expected_parts(base, target)
    checked = 0
    for d in result.details:
        b, t, source = parts[d["name"]]
        if b.ndim != 2:
            assert d["row"]["rank"] is None
            continue
        e = ref.spectrum(t - b)
        for key in ("rank", "full_rank", "rank90", "rank99"):
            assert d[key] == e[key], (d["name"], key)
        assert d["effective_rank"] == pytest.approx(e["effective_rank"], rel=1e-6)
        assert d["stable_rank"] == pytest.approx(e["stable_rank"], rel=1e-6)
        idx, sigma = d["spectrum"]
        np.testing.assert_allclose(sigma, e["sigma"][idx], rtol=1e-6, atol=1e-7 * e["sigma"][0])
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    "kind,heads_key", [("llama", "num_attention_heads"), ("gpt2", "n_head"), ("neox", "num_attention_heads")]
)
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_update_maps_match_numpy(family_pair, kind, heads_key, fused):
    base, target = family_pair(kind)
    tau = 1e-5
    result = run_analysis(
        "pair",
        [str(base), str(target)],
        Options(taus=[tau], device="cpu", rank=False, fused=fused, chunk_elements=700),
    )
    parts = expected_parts(base, target)
    config = config_of(base)
    for d in result.details:
        b, t, _ = parts[d["name"]]
        if b.ndim != 2:
            assert "update_map" not in d
            continue
        mask = np.abs(t - b) > tau
        matrix = d["row"]["matrix"]
        heads = config[heads_key] if matrix in ("q", "o") else None
        e = ref.update_map(mask, heads, heads_on_rows=matrix != "o")
        m = d["update_map"]
        assert (m["grid_rows"], m["grid_cols"]) == (e["grid_rows"], e["grid_cols"])
        np.testing.assert_allclose(m["cells"], e["cells"], rtol=1e-12)
        assert mask.shape[0] <= 1024 and mask.shape[1] <= 1024  # profiles are then one entry per row / column
        np.testing.assert_allclose(np.asarray(m["row_frac"]) * mask.shape[1], e["rows"], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(m["col_frac"]) * mask.shape[0], e["cols"], rtol=1e-12)
        if heads:
            np.testing.assert_allclose(m["head_frac"], e["head_frac"], rtol=1e-12)


def test_fused_parts_add_up_to_the_fused_tensor(family_pair):
    for kind, fused in [
        ("gpt2", "transformer.h.0.attn.c_attn.weight"),
        ("neox", "gpt_neox.layers.1.attention.query_key_value.weight"),
        ("phi3", "model.layers.0.self_attn.qkv_proj.weight"),
        ("phi3", "model.layers.1.mlp.gate_up_proj.weight"),
    ]:
        base, target = family_pair(kind)
        result = run_analysis(
            "pair", [str(base), str(target)], Options(taus=[1e-6, 1e-3], device="cpu", rank=False)
        )
        b, t = ref.load(base)[fused], ref.load(target)[fused]
        pieces = [d for d in result.details if d["row"]["source"] == fused]
        assert len(pieces) >= 2
        for i, tau in enumerate([1e-6, 1e-3]):
            assert sum(p["changed_abs"][i] for p in pieces) == ref.changed(b, t, tau)
        assert sum(p["row"]["numel"] for p in pieces) == b.size
        assert {p["row"]["matrix"] for p in pieces} <= {"q", "k", "v", "gate", "up"}


def test_similarity_and_summary(family_pair):
    base, target = family_pair("llama")
    doc = run_analysis("pair", [str(base), str(target)], Options(taus=[1e-5], device="cpu")).document
    b, t = ref.load(base), ref.load(target)
    n = sum(v.size for v in b.values())
    changed = sum(ref.changed(b[k], t[k], 1e-5) for k in b)
    sim = doc["summary"]["similarity"]
    assert sim["equal_share"] == pytest.approx(1 - changed / n, rel=1e-12)
    num = np.sqrt(sum(((t[k] - b[k]) ** 2).sum() for k in b))
    den = np.sqrt(sum((b[k] ** 2).sum() for k in b))
    assert sim["relative_l2"] == pytest.approx(num / den, rel=1e-9)
    by_block = {g["block"]: g for g in doc["summary"]["by_block"]}
    assert sum(g["numel"] for g in by_block.values()) == n
    assert by_block["norm"]["changed"][0]["count"] < 0.05 * by_block["norm"]["numel"]  # perturb_ spares norms
