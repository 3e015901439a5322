"""Issue 12, items 2 and 6: fused 3-D MoE experts split per expert (and gate/up), other 3-D
tensors per leading index; resized vocabularies compared on their shared rows, tied heads matched
across save styles, dtype changes warned about. Every figure against float64 NumPy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference as ref
import torch
from conftest import build, perturb_, run_cli, save
from safetensors.torch import save_file
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from deltalens.worker.analyses import Options, run_analysis

TAU = 1e-5
E, H, INTER = 3, 32, 24  # experts, hidden, expert intermediate


def _gpt_oss():
    return GptOssForCausalLM(
        GptOssConfig(
            vocab_size=64,
            hidden_size=H,
            intermediate_size=INTER,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=E,
            num_experts_per_tok=2,
            layer_types=["full_attention"] * 2,
        )
    )


def _llama4():
    return Llama4ForCausalLM(
        Llama4TextConfig(
            vocab_size=64,
            hidden_size=H,
            intermediate_size=INTER,
            intermediate_size_mlp=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=E,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
        )
    )


def _pair(tmp_path, make, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = make().to(dtype)
    model.save_pretrained(tmp_path / "base")
    perturb_(model, seed=3, fraction=0.3)
    model.save_pretrained(tmp_path / "target")
    return tmp_path / "base", tmp_path / "target"


def _expected_expert_parts(name: str, w: np.ndarray, layout: str) -> dict[str, tuple[int, str, np.ndarray]]:
    """display name -> (expert, matrix, (out, in) float64 matrix), from the modeling code's layout."""
    out = {}
    for e in range(w.shape[0]):
        x = w[e]
        if layout == "gate_up_t_interleaved":  # gpt-oss: x @ W, gate = [..., ::2], up = [..., 1::2]
            out[f"{name}[{e}][gate]"], out[f"{name}[{e}][up]"] = (e, "gate", x.T[0::2]), (e, "up", x.T[1::2])
        elif layout == "gate_up_t_halves":  # Llama-4: bmm(x, W).chunk(2, -1)
            g, u = np.split(x.T, 2)
            out[f"{name}[{e}][gate]"], out[f"{name}[{e}][up]"] = (e, "gate", g), (e, "up", u)
        elif layout == "gate_up_halves":  # transformers-5 Mixtral/Qwen-MoE: linear(x, W).chunk(2, -1)
            g, u = np.split(x, 2)
            out[f"{name}[{e}][gate]"], out[f"{name}[{e}][up]"] = (e, "gate", g), (e, "up", u)
        elif layout == "down_t":
            out[f"{name}[{e}]"] = (e, "down", x.T)
        elif layout == "down":
            out[f"{name}[{e}]"] = (e, "down", x)
        elif layout == "bias_interleaved":
            out[f"{name}[{e}][gate]"], out[f"{name}[{e}][up]"] = (e, "bias", x[0::2]), (e, "bias", x[1::2])
        elif layout == "bias":
            out[f"{name}[{e}]"] = (e, "bias", x)
    return out


def _check_experts(doc, base, target, layouts: dict[str, str]):
    rows = {t["name"]: t for t in doc["tensors"]}
    checked = 0
    for name, w in base.items():
        layout = next((lay for suffix, lay in layouts.items() if name.endswith(suffix)), None)
        if layout is None:
            continue
        want_b = _expected_expert_parts(name, w, layout)
        want_t = _expected_expert_parts(name, target[name], layout)
        assert {n for n in rows if rows[n]["source"] == name} == set(want_b), name
        fused_changed = ref.changed(w, target[name], TAU)
        assert sum(rows[n]["changed"][0]["count"] for n in want_b) == fused_changed  # parts add up
        for n, (expert, matrix, b) in want_b.items():
            t, row = want_t[n][2], rows[n]
            assert (row["expert"], row["matrix"], row["block"]) == (expert, matrix, "mlp"), n
            assert row["shape"] == list(b.shape) and row["numel"] == b.size
            assert row["changed"][0]["count"] == ref.changed(b, t, TAU), n
            assert row["norm_delta"] == pytest.approx(np.linalg.norm(t - b), rel=1e-9)
            if b.ndim == 2:
                spec = ref.spectrum(t - b)
                assert (row["rank"], row["full_rank"]) == (spec["rank"], spec["full_rank"]), n
                assert row["stable_rank"] == pytest.approx(spec["stable_rank"], rel=1e-6)
            else:
                assert row["rank"] is None
            checked += 1
    return checked


@pytest.mark.parametrize("fused", [True, False], ids=["c-kernel", "torch-kernel"])
def test_gpt_oss_fused_experts_split_per_expert_and_interleaved_gate_up(tmp_path, fused):
    b_dir, t_dir = _pair(tmp_path, _gpt_oss)
    doc = run_analysis("pair", [str(b_dir), str(t_dir)], Options(taus=[TAU], fused=fused)).document
    assert doc["family"] == "gpt_oss"
    base, target = ref.load(b_dir), ref.load(t_dir)
    layouts = {
        "experts.gate_up_proj": "gate_up_t_interleaved",
        "experts.gate_up_proj_bias": "bias_interleaved",
        "experts.down_proj": "down_t",
        "experts.down_proj_bias": "bias",
    }
    # 2 layers x 3 experts x (gate, up, down, gate bias, up bias, down bias)
    assert _check_experts(doc, base, target, layouts) == 2 * E * 6
    assert doc["summary"]["numel"] == sum(v.size for v in base.values())
    assert doc["summary"]["changed"][0]["count"] == sum(ref.changed(base[n], target[n], TAU) for n in base)
    router = [t for t in doc["tensors"] if t["source"].endswith("mlp.router.weight")]
    assert router and all(t["matrix"] == "other" and t["expert"] is None for t in router)


def test_llama4_fused_experts_are_transposed_halves(tmp_path):
    b_dir, t_dir = _pair(tmp_path, _llama4, torch.float32)
    doc = run_analysis("pair", [str(b_dir), str(t_dir)], Options(taus=[TAU])).document
    assert doc["family"] == "llama4"
    base, target = ref.load(b_dir), ref.load(t_dir)
    layouts = {"experts.gate_up_proj": "gate_up_t_halves", "experts.down_proj": "down_t"}
    assert _check_experts(doc, base, target, layouts) == 2 * E * 3
    series = run_analysis("series", [str(b_dir), str(t_dir)], Options(taus=[TAU])).document
    pair_rows = {t["name"]: t["changed"][0]["count"] for t in doc["tensors"]}
    assert {t["name"]: t["steps"][0]["changed"] for t in series["tensors"]} == pair_rows
    shared = [t for t in doc["tensors"] if "shared_expert" in t["source"]]
    assert {t["matrix"] for t in shared} == {"gate", "up", "down"}


def test_transformers5_in_memory_layout_and_other_3d_tensors(tmp_path):
    """A Qwen3-MoE state dict as transformers 5 holds it ([E, 2I, H] gate|up, [E, H, I]), written
    with safetensors, plus an unknown 3-D tensor: per leading index, each a matrix with a rank."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=E,
        num_experts_per_tok=2,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 32, H)
    g = torch.Generator().manual_seed(5)
    sd["extra.mixer.weight"] = torch.randn(4, 6, 5, generator=g)
    paths = []
    for i, label in enumerate(("base", "target")):
        (tmp_path / label).mkdir()
        if i:
            model.load_state_dict({k: v for k, v in sd.items() if k != "extra.mixer.weight"}, strict=False)
            perturb_(model, seed=9, fraction=0.4)
            sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()} | {
                "extra.mixer.weight": sd["extra.mixer.weight"] + (torch.rand(4, 6, 5, generator=g) < 0.5)
            }
        save_file(sd, tmp_path / label / "model.safetensors")
        config.save_pretrained(tmp_path / label)
        paths.append(tmp_path / label)
    doc = run_analysis("pair", [str(p) for p in paths], Options(taus=[TAU])).document
    base, target = ref.load(paths[0]), ref.load(paths[1])
    layouts = {"experts.gate_up_proj": "gate_up_halves", "experts.down_proj": "down"}
    assert _check_experts(doc, base, target, layouts) == E * 3
    rows = [t for t in doc["tensors"] if t["source"] == "extra.mixer.weight"]
    assert [r["name"] for r in rows] == [f"extra.mixer.weight[{i}]" for i in range(4)]
    for i, r in enumerate(rows):
        b, t = base["extra.mixer.weight"][i], target["extra.mixer.weight"][i]
        assert r["shape"] == [6, 5] and r["expert"] is None
        assert r["changed"][0]["count"] == ref.changed(b, t, TAU)
        assert r["rank"] == ref.spectrum(t - b)["rank"]


def test_resized_vocabulary_compares_the_shared_rows(tmp_path):
    model = build("llama")
    base_dir = save(model, "llama", tmp_path / "base")
    model.resize_token_embeddings(96 + 8)
    perturb_(model, seed=4)
    target_dir = save(model, "llama", tmp_path / "target")
    doc = run_analysis("pair", [str(base_dir), str(target_dir)], Options(taus=[TAU])).document
    base, target = ref.load(base_dir), ref.load(target_dir)
    resized = {r["name"]: r for r in doc["skipped"]["resized"]}
    assert set(resized) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert not doc["skipped"]["shape_mismatch"]
    for name, r in resized.items():
        assert r["shapes"] == [[96, 64], [104, 64]] and r["compared_rows"] == 96 and r["extra_rows"] == [0, 8]
        row = next(t for t in doc["tensors"] if t["name"] == name)
        b, t = base[name], target[name][:96]
        assert row["shape"] == [96, 64] and row["numel"] == b.size
        assert row["changed"][0]["count"] == ref.changed(b, t, TAU)
        assert row["rank"] == ref.spectrum(t - b)["rank"]
    total = sum(ref.changed(base[n], target[n][: base[n].shape[0]], TAU) for n in base)
    assert doc["summary"]["changed"][0]["count"] == total
    assert doc["summary"]["numel"] == sum(v.size for v in base.values())


def _qwen2(tie: bool):
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tie,
        )
    )


@pytest.mark.parametrize("tied_side", ["base", "target"])
def test_tied_head_matches_the_embedding_across_save_styles(tmp_path, tied_side):
    torch.manual_seed(0)
    tied = _qwen2(True)
    untied = _qwen2(False)
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.lm_head.weight.clone()})
    perturb_(untied, seed=6)
    tied_dir, untied_dir = tmp_path / "tied", tmp_path / "untied"
    tied.save_pretrained(tied_dir)
    untied.save_pretrained(untied_dir)
    assert "lm_head.weight" not in ref.load(tied_dir)
    paths = [tied_dir, untied_dir] if tied_side == "base" else [untied_dir, tied_dir]
    doc = run_analysis("pair", [str(p) for p in paths], Options(taus=[TAU])).document
    base, target = ref.load(paths[0]), ref.load(paths[1])
    embed = "model.embed_tokens.weight"
    b = base.get("lm_head.weight", base[embed])
    t = target.get("lm_head.weight", target[embed])
    row = next(r for r in doc["tensors"] if r["name"] == "lm_head.weight")
    assert row["tied_to"] == embed and row["matrix"] == "lm_head"
    assert row["changed"][0]["count"] == ref.changed(b, t, TAU) > 0
    assert row["norm_delta"] == pytest.approx(np.linalg.norm(t - b), rel=1e-9)
    assert "lm_head.weight" not in doc["skipped"]["only_base"] + doc["skipped"]["only_target"]
    assert [w["code"] for w in doc["warnings"]] == ["tied_embedding"]


def test_dtype_change_is_a_warning_in_json_and_summary(tmp_path):
    model = build("llama").to(torch.float32)
    base_dir = save(model, "llama", tmp_path / "base")
    target_dir = save(model.to(torch.bfloat16), "llama", tmp_path / "target")
    proc = run_cli("analyze", base_dir, target_dir, "--json", "-", check=True)
    doc = json.loads(proc.stdout)
    base, target = ref.load(base_dir), ref.load(target_dir)
    assert doc["summary"]["changed"][0]["count"] == sum(ref.changed(base[n], target[n], TAU) for n in base)
    assert [w["code"] for w in doc["warnings"]] == ["dtype_change"]
    assert (
        f"{len(base)} tensors" in doc["warnings"][0]["message"]
        and "base F32, target BF16" in (doc["warnings"][0]["message"])
    )
    assert all(t["dtypes"] == ["F32", "BF16"] for t in doc["tensors"])
    text = run_cli("analyze", base_dir, target_dir, check=True).stdout
    assert "warning: " in text and "base F32, target BF16" in text
    same = run_analysis("pair", [str(base_dir), str(base_dir)], Options()).document
    assert same["warnings"] == [] and "dtypes" not in same["tensors"][0]
