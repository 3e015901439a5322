"""PEFT LoRA adapters read as the merged model, against figures computed here in float64.

Adapters are made by peft itself (get_peft_model + save_pretrained) on a tiny bf16 Llama written by
transformers; the reference merges them with NumPy in float64 and rounds to bf16 by picking the
nearest bf16 value (ties to even) among neighbours — no bit tricks shared with deltalens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from conftest import build, save
from safetensors.torch import load_file

from deltalens.worker import adapters
from deltalens.worker.checkpoint import checkpoint_files, open_checkpoints
from deltalens.worker.cli import run

peft = pytest.importorskip("peft")

TAUS = [1e-5, 1e-3]
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _bf16_nearest(x: np.ndarray) -> np.ndarray:
    """float64 -> bf16 values (as float64), nearest with ties to even, from candidate neighbours."""
    t = torch.from_numpy(x)
    guess = t.to(torch.bfloat16)  # may be off by one ulp (float64 -> float32 -> bf16 double rounding)
    up = torch.nextafter(guess, torch.tensor(float("inf"), dtype=torch.bfloat16))
    down = torch.nextafter(guess, torch.tensor(float("-inf"), dtype=torch.bfloat16))
    cands = torch.stack([down, guess, up])  # (3, ...) bf16
    dist = (cands.double() - t).abs()  # exact: neighbours within an ulp (Sterbenz)
    even = (cands.view(torch.int16) & 1) == 0
    tie = dist == dist.min(0).values  # the nearest ones; of two, the even one
    pick = torch.where(tie & even, 0, torch.where(tie, 1, 2)).argmin(0)
    return torch.gather(cands.double(), 0, pick.unsqueeze(0)).squeeze(0).numpy()


def _lora(base_dir: Path, out: Path, seed: int, **config) -> Path:
    model = _load_base(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # nonzero B (peft starts it at zero) and A, at a visible scale
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out)
    return out


def _load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save(build("llama"), "llama", root / "base")
    plain = _lora(base, root / "plain", 1, r=4, lora_alpha=8)
    rs = _lora(
        base,
        root / "rs",
        2,
        r=4,
        lora_alpha=6,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    return base, plain, rs


def _base_tensors(base: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(base.glob("*.safetensors")):  # the tiny llama is written in shards
        out.update(load_file(shard))
    return out


def _reference(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    """Base tensors (float64) with every adapted module merged exactly and rounded to bf16."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = {k: v.double().numpy() for k, v in _base_tensors(base).items()}
    factors = {k: v.double().numpy() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    for key in factors:
        if "lora_A" not in key and "lora_embedding_A" not in key:
            continue
        emb = "lora_embedding_A" in key
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        short = module.rsplit(".", 1)[-1]
        r = cfg["rank_pattern"].get(short, cfg["r"])
        alpha = cfg["alpha_pattern"].get(short, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        a, b = factors[key], factors[key.replace("_A", "_B")]
        delta = scale * (b @ a)
        name = module + ".weight"
        weights[name] = _bf16_nearest(weights[name] + (delta.T if emb else delta))
    return weights


def _analyze(tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    taus = [str(t) for t in TAUS]
    assert run([*args, "--tau", *taus, "--json", str(out), "--quiet", "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_bf16_rounding_is_nearest_even():
    """adapters.round_to agrees with the nearest-neighbour reference, midpoints included."""
    g = np.random.default_rng(0)
    x = g.standard_normal(200_000) * 10.0 ** g.integers(-6, 3, 200_000)
    bits = (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).astype(np.uint64)
    lo = (bits.astype(np.uint32)).view(np.float32).astype(np.float64)
    hi = ((bits + 0x10000).astype(np.uint32)).view(np.float32).astype(np.float64)
    mid = (lo + hi) / 2  # exact ties, and values a hair off them (double rounding would go wrong)
    x = np.concatenate([x, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), [0.0, -0.0]])
    ours = (adapters.round_to(x, "BF16").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert np.array_equal(ours, _bf16_nearest(x))


@pytest.mark.parametrize("which", ["plain", "rs"])
def test_adapter_pair_counts_equal_float64_reference(tmp_path, lora, which):
    base, plain, rs = lora
    adapter = plain if which == "plain" else rs
    doc = _analyze(tmp_path, "analyze", str(base), str(adapter), "--out", str(tmp_path / "r.duckdb"))
    ref = _reference(base, adapter)
    b = {k: v.double().numpy() for k, v in _base_tensors(base).items()}
    rows = {t["name"]: t for t in doc["tensors"]}
    assert set(rows) == set(b)  # every base tensor is reported: unadapted ones too
    assert doc["skipped"].get("only_base", []) == [] and doc["skipped"].get("only_target", []) == []
    adapted = {n for n in b if any(f".{t}." in n for t in TARGETS)}
    assert len(adapted) == 2 * 3 + 1
    for name, row in rows.items():
        delta = np.abs(ref[name] - b[name])
        expected = [int((delta > t).sum()) for t in TAUS]
        assert [c["count"] for c in row["changed"]] == expected, name
        if name not in adapted:
            assert expected == [0, 0], name  # unadapted: the base's own tensor, unchanged
        else:
            assert expected[0] > 0, name
    # exact ΔW figures: counts, norm, rank = r, singular values
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    factors = {k: v.double().numpy() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    (figures,) = doc["adapters"]
    assert figures["use_rslora"] == cfg["use_rslora"]
    modules = {m["name"]: m for m in figures["modules"]}
    assert set(modules) == adapted
    for name, m in modules.items():
        module, short = name.removesuffix(".weight"), name.split(".")[-2]
        emb = short == "embed_tokens"
        a = factors[f"base_model.model.{module}." + ("lora_embedding_A" if emb else "lora_A.weight")]
        bb = factors[f"base_model.model.{module}." + ("lora_embedding_B" if emb else "lora_B.weight")]
        r = cfg["rank_pattern"].get(short, cfg["r"])
        alpha = cfg["alpha_pattern"].get(short, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        assert (m["r"], m["alpha"]) == (r, alpha) and m["scale"] == pytest.approx(scale, rel=1e-15)
        delta = scale * (bb @ a)
        assert [c["count"] for c in m["changed"]] == [int((np.abs(delta) > t).sum()) for t in TAUS]
        assert m["norm_delta"] == pytest.approx(np.linalg.norm(delta), rel=1e-12)
        sigma = np.linalg.svd(delta, compute_uv=False)
        assert m["rank"] == r == a.shape[0]
        np.testing.assert_allclose(m["singular_values"], sigma[:r], rtol=1e-9)
    with duckdb.connect(str(tmp_path / "r.duckdb"), read_only=True) as con:  # the same figures, as rows
        stored = con.execute(
            "SELECT name, run, r, taus, counts, norm_delta, rank FROM adapter_modules ORDER BY name"
        ).fetchall()
    assert stored == [
        (n, 1, m["r"], TAUS, [c["count"] for c in m["changed"]], m["norm_delta"], m["rank"])
        for n, m in sorted(modules.items())
    ]
    if which == "rs":
        assert modules["model.layers.0.self_attn.v_proj.weight"]["r"] == 2
        assert modules["model.layers.1.mlp.down_proj.weight"]["scale"] == pytest.approx(3 / 2)


@pytest.mark.parametrize("which", ["plain", "rs"])
def test_merged_tensors_agree_with_peft_merge_and_unload(lora, which):
    base, plain, rs = lora
    adapter = plain if which == "plain" else rs
    merged = peft.PeftModel.from_pretrained(_load_base(base), adapter).merge_and_unload().state_dict()
    _, ours = open_checkpoints([base, adapter])
    ref = _reference(base, adapter)
    base_values = {k: v.double().numpy() for k, v in _base_tensors(base).items()}
    for name in ours.names():
        mine = adapters.as_float64(ours.array(name), ours.meta(name).dtype)
        assert np.array_equal(mine, ref[name]), name  # deltalens = the exact merge, rounded once
        theirs = merged[name].double().numpy()
        # peft rounds in between (the float32 product; an embedding's ΔW to bf16 before the add): it
        # stays within one bf16 step of ΔW and of the result, and Linear weights rarely differ at all
        step = 2.0**-7 * (np.abs(mine - base_values[name]) + np.abs(mine))
        assert np.all(np.abs(theirs - mine) <= step), name
        if "embed_tokens" not in name:
            assert np.mean(theirs != mine) < 0.01, name


def test_adapter_vs_adapter_and_overlap(tmp_path, lora):
    base, plain, rs = lora
    ref_a, ref_b = _reference(base, plain), _reference(base, rs)
    b = {k: v.double().numpy() for k, v in _base_tensors(base).items()}
    # the adapters were made on a model loaded from `base`, so their configs name it: A vs B alone
    assert json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    doc = _analyze(tmp_path, "analyze", str(plain), str(rs))
    for row in doc["tensors"]:
        delta = np.abs(ref_b[row["name"]] - ref_a[row["name"]])
        assert [c["count"] for c in row["changed"]] == [int((delta > t).sum()) for t in TAUS]
    assert [f["adapter"] for f in doc["adapters"]] == [str(plain), str(rs)]
    doc = _analyze(tmp_path, "overlap", str(base), str(plain), str(rs))
    masks = [{n: np.abs(r[n] - b[n]) > TAUS[0] for n in b} for r in (ref_a, ref_b)]
    assert doc["summary"]["changed"] == [sum(int(m[n].sum()) for n in b) for m in masks]
    both = sum(int((masks[0][n] & masks[1][n]).sum()) for n in b)
    assert doc["summary"]["pairs"][0]["both"] == both


def test_relative_mode_counts_merged_and_exact_delta(tmp_path, lora):
    base, plain, _ = lora
    out = tmp_path / "rel.json"
    assert (
        run(["analyze", str(base), str(plain), "--relative", "--tau", "1e-2", "--json", str(out), "--quiet"])
        == 0
    )
    doc = json.loads(out.read_text())
    ref, b = _reference(base, plain), {k: v.double().numpy() for k, v in _base_tensors(base).items()}
    for row in doc["tensors"]:
        n = row["name"]
        assert row["changed"][0]["count"] == int((np.abs(ref[n] - b[n]) > 1e-2 * np.abs(b[n])).sum()), n
    factors = {k: v.double().numpy() for k, v in load_file(plain / "adapter_model.safetensors").items()}
    for m in doc["adapters"][0]["modules"]:
        module = "base_model.model." + m["name"].removesuffix(".weight")
        emb = "embed_tokens" in module
        a = factors[module + (".lora_embedding_A" if emb else ".lora_A.weight")]
        bb = factors[module + (".lora_embedding_B" if emb else ".lora_B.weight")]
        delta = 2.0 * (bb @ a)
        delta = delta.T if emb else delta
        expected = int((np.abs(delta) > 1e-2 * np.abs(b[m["name"]])).sum())
        assert m["changed"][0]["count"] == expected, m["name"]


def _broken(tmp_path, plain, edit=None, drop=None) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    for f in plain.iterdir():
        if f.name != drop:
            (out / f.name).write_bytes(f.read_bytes())
    if edit:
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "case, problem",
    [
        ("no weights", "no adapter_model.safetensors or adapter_model.bin"),
        ("r zero", "r must be a positive integer, got 0"),
        ("r wrong", "rows but r = 3"),
        ("dora", "use_dora adapters are not supported"),
        ("hub base", "name the base checkpoint first"),
    ],
)
def test_a_broken_adapter_is_a_one_line_error(tmp_path, lora, capsys, case, problem):
    base, plain, _ = lora
    edits = {
        "r zero": lambda c: c.update(r=0),
        "r wrong": lambda c: c.update(r=3),
        "dora": lambda c: c.update(use_dora=True),
        "hub base": lambda c: c.update(base_model_name_or_path="org/not-here"),
    }
    bad = _broken(
        tmp_path, plain, edits.get(case), "adapter_model.safetensors" if case == "no weights" else None
    )
    args = [str(bad), str(plain)] if case == "hub base" else [str(base), str(bad)]
    assert run(["analyze", *args, "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(bad) in err[0], err


def test_adapter_files_are_the_ones_pinned(lora):
    _, plain, _ = lora
    assert [p.name for p in checkpoint_files(plain)] == ["adapter_config.json", "adapter_model.safetensors"]
