"""fp8 / block-scaled checkpoints (issue 12, item 3): weights compared as code × scale, exactly.

Checkpoints are built here from a tiny Llama: its linear weights block-quantized to float8 with
torch (DeepSeek-V3 layout: `<name>` F8_E4M3 + `<name>_scale_inv` F32, blocks of 32×24 from config.json,
on shapes that are not multiples of the block), or with per-tensor / per-channel scales. Every count
is checked against real values computed here in float64 NumPy from the codes and scales the test
wrote (scale entry of element (i, j) = scale[i // bm, j // bn]), not read back by the engine.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from conftest import run_cli
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.checkpoint import open_checkpoint
from deltalens.worker.errors import InputError
from deltalens.worker.quantized import fp8_mode

TAUS = [0.0, 1e-4, 1e-3, 1e-2]
BLOCK = (32, 24)  # rows × columns: not square, and ragged on 64 and 80
SQUARE = (32, 32)  # inferable from these shapes (64 is a multiple of it)
FORMATS = {"F8_E4M3": (torch.float8_e4m3fn, 448.0), "F8_E5M2": (torch.float8_e5m2, 57344.0)}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- building fp8 checkpoints --------------------------------------------------------------------
def llama() -> tuple[dict[str, np.ndarray], dict]:
    """A tiny Llama's float32 weights (as float64) and its config; intermediate 80 is ragged for 32."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    return {n: t.double().numpy() for n, t in model.state_dict().items()}, config.to_dict()


WEIGHTS, CONFIG = llama()
QUANTIZED = sorted(n for n in WEIGHTS if any(f".{p}.weight" in n for p in LINEAR))


def spread(scale: np.ndarray, shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    """The scale entry of every element: scale[i // bm, j // bn]."""
    rows, cols = np.arange(shape[0])[:, None] // block[0], np.arange(shape[1])[None, :] // block[1]
    return scale[rows, cols]


def block_quantize(w: np.ndarray, fmt: str, block=BLOCK) -> tuple[torch.Tensor, np.ndarray]:
    """fp8 codes and the float32 block scales (amax / half the fp8 range: doubled codes still fit)."""
    (bm, bn), top = block, FORMATS[fmt][1]
    grid = (math.ceil(w.shape[0] / bm), math.ceil(w.shape[1] / bn))
    amax = np.array(
        [
            [np.abs(w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]).max() for j in range(grid[1])]
            for i in range(grid[0])
        ]
    )
    scale = np.where(amax > 0, amax / (top / 2), 1.0).astype(np.float32)
    codes = torch.from_numpy(w / spread(scale.astype(np.float64), w.shape, block)).to(FORMATS[fmt][0])
    return codes, scale


def real(codes: torch.Tensor, scale: np.ndarray, block=BLOCK) -> np.ndarray:
    """code × scale in float64 (the reference for the engine's dequantized values)."""
    c = codes.double().numpy()
    return c * spread(scale.astype(np.float64), c.shape, block)


def rescale(
    codes: torch.Tensor, scale: np.ndarray, seed: int, block=BLOCK
) -> tuple[torch.Tensor, np.ndarray]:
    """The same real values, other codes: per block codes × 2^k and scale × 2^-k, k ∈ {0, 1} (exact)."""
    k = np.random.default_rng(seed).integers(0, 2, size=scale.shape)
    doubled = codes.double().numpy() * spread(2.0**k, codes.shape, block)
    new = torch.from_numpy(doubled).to(codes.dtype)
    assert np.array_equal(new.double().numpy(), doubled)
    return new, (scale * 2.0 ** (-k)).astype(np.float32)


def bump(codes: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, torch.Tensor]:
    """k codes moved one step (raw bits + 1, still finite) at random places: k real changes."""
    rng, out = np.random.default_rng(seed), {n: c.clone() for n, c in codes.items()}
    places = sorted({(str(rng.choice(QUANTIZED)), int(rng.integers(0, 1 << 30))) for _ in range(4 * k)})
    done = set()
    for name, seed_index in places:
        bits = out[name].view(torch.uint8).reshape(-1)
        index = seed_index % bits.numel()
        nxt = torch.tensor([int(bits[index]) + 1], dtype=torch.uint8).view(out[name].dtype)
        if (name, index) in done or int(bits[index]) == 255 or not torch.isfinite(nxt.float()).all():
            continue
        bits[index] += 1
        done.add((name, index))
        if len(done) == k:
            return out
    raise AssertionError("not enough places to plant changes")


def write(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1
) -> Path:
    """A checkpoint folder: config.json and model.safetensors, or `shards` files and an index that
    puts each weight and its scale in different shards."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names, weight_map = sorted(tensors), {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[k::shards]}, folder / file)
        weight_map.update({n: file for n in names[k::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def fp8_config(block=BLOCK) -> dict:
    return {**CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}


def bf16(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(w).to(torch.bfloat16)


def plain() -> dict[str, torch.Tensor]:
    """The weights that stay bf16 in an fp8 model (embeddings, norms, head), as DeepSeek-V3 keeps them."""
    return {n: bf16(w) for n, w in WEIGHTS.items() if n not in QUANTIZED}


def deepseek(codes: dict[str, torch.Tensor], scales: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """fp8 weights with their `<name>_scale_inv`, plus the bf16 rest and an activation scale per layer."""
    out = plain()
    for n in QUANTIZED:
        out[n], out[n + "_scale_inv"] = codes[n], torch.from_numpy(scales[n])
        out[n.replace(".weight", ".input_scale")] = torch.tensor(1.0)
    return out


def quantized(fmt: str = "F8_E4M3", block=BLOCK):
    pairs = {n: block_quantize(WEIGHTS[n], fmt, block) for n in QUANTIZED}
    return {n: c for n, (c, _) in pairs.items()}, {n: s for n, (_, s) in pairs.items()}


# --- comparing -----------------------------------------------------------------------------------
def pair(base: Path, target: Path, taus=TAUS, **kw) -> dict:
    return run_analysis("pair", [str(base), str(target)], Options(taus=taus, device="cpu", **kw)).document


def counts(doc: dict) -> list[int]:
    return [c["count"] for c in doc["summary"]["changed"]]


def expected(base: dict[str, np.ndarray], target: dict[str, np.ndarray], taus=TAUS) -> list[int]:
    return [sum(ref.changed(base[n], target[n], tau) for n in base) for tau in taus]


def by_source(doc: dict, tau_index: int = 0) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in doc["tensors"]:
        out[row["source"]] = out.get(row["source"], 0) + row["changed"][tau_index]["count"]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (fp8, block scales), the same values re-scaled (sharded), and that with 37 codes bumped;
    with their real values, their codes and the bf16 model they were quantized from."""
    root = tmp_path_factory.mktemp("fp8")
    codes, scales = quantized()
    again = {n: rescale(codes[n], scales[n], seed=i) for i, n in enumerate(QUANTIZED)}
    codes2, scales2 = {n: c for n, (c, _) in again.items()}, {n: s for n, (_, s) in again.items()}
    codes3 = bump(codes2, 37, seed=5)
    values = {
        label: {**rest(), **{n: real(c[n], s[n]) for n in QUANTIZED}}
        for label, c, s in (
            ("base", codes, scales),
            ("rescaled", codes2, scales2),
            ("planted", codes3, scales2),
        )
    }
    return {
        "root": root,
        "base": write(root / "base", deepseek(codes, scales), fp8_config()),
        "rescaled": write(root / "rescaled", deepseek(codes2, scales2), fp8_config(), shards=3),
        "planted": write(root / "planted", deepseek(codes3, scales2), fp8_config(), shards=3),
        "bf16": write(root / "bf16", {**plain(), **{n: bf16(WEIGHTS[n]) for n in QUANTIZED}}),
        "values": values,
        "codes": {"base": codes, "rescaled": codes2, "planted": codes3},
    }


# --- (a) re-scaled, equal values ------------------------------------------------------------------
def test_rescaled_model_is_unchanged_but_raw_codes_differ(models):
    values, codes = models["values"], models["codes"]
    assert not np.array_equal(values["base"][QUANTIZED[0]], WEIGHTS[QUANTIZED[0]])  # quantized for real
    for n in QUANTIZED:
        assert np.array_equal(values["base"][n], values["rescaled"][n])
    assert expected(values["base"], values["rescaled"]) == [0] * len(TAUS)
    for fused in (None, False):  # the C kernel (both F64) and the torch kernel
        doc = pair(models["base"], models["rescaled"], fused=fused)
        assert counts(doc) == [0] * len(TAUS)
        assert doc["summary"]["similarity"]["relative_l2"] == 0.0
    # --fp8 raw: the stored fp8 values without their scales, through the CLI
    proc = run_cli("analyze", models["base"], models["rescaled"], "--fp8", "raw", "--tau", "0", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    raw = json.loads(proc.stdout)
    code_values = {k: {n: c.double().numpy() for n, c in v.items()} for k, v in codes.items()}
    want = {n: ref.changed(code_values["base"][n], code_values["rescaled"][n], 0.0) for n in QUANTIZED}
    got = by_source(raw)
    assert {n: got[n] for n in QUANTIZED} == want and sum(want.values()) > 1000
    assert sum(got.values()) == sum(want.values())  # the bf16 rest is identical
    assert any("--fp8 raw" in note for note in raw["notes"])
    # the same through the context manager the CLI uses
    with fp8_mode("raw"):
        assert counts(pair(models["base"], models["rescaled"], taus=[0.0])) == [sum(want.values())]


# --- (b) planted changes --------------------------------------------------------------------------
def test_planted_changes_counted_exactly(models):
    values = models["values"]
    want = expected(values["base"], values["planted"])
    assert want[0] == 37 and want[-1] < 37
    for fused in (None, False):
        doc = pair(models["base"], models["planted"], fused=fused)
        assert counts(doc) == want
    for n, count in by_source(doc).items():
        assert count == ref.changed(values["base"][n], values["planted"][n], 0.0)
    series = run_analysis(
        "series",
        [str(models["base"]), str(models["rescaled"]), str(models["planted"])],
        Options(taus=[0.0], device="cpu"),
    ).document
    assert [s["changed"] for s in series["steps"]] == [0, 37]
    proc = run_cli("analyze", models["base"], models["planted"], "--tau", *map(str, TAUS), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert counts(json.loads(proc.stdout)) == want


# --- (c) per-tensor and per-channel scales, no config block -----------------------------------------
CONVENTIONS = [  # (scale name, scale shape for m rows; None: block grid), cycled over QUANTIZED
    ("{name}_scale", lambda m: ()),  # per tensor, compressed-tensors
    ("{module}.scale", lambda m: (1,)),  # per tensor
    ("{name}_scale", lambda m: (m,)),  # per output channel
    ("{module}.scale", lambda m: (m, 1)),  # per output channel
    ("{name}_scale_inv", None),  # blocks of 32×32, inferred (no quantization_config)
]


def rest() -> dict[str, np.ndarray]:
    """The real values of the weights an fp8 model keeps in bf16."""
    return {n: t.double().numpy() for n, t in plain().items()}


def conventional(weights: dict[str, np.ndarray], fmt: str, seed: int):
    """fp8 weights with the scales of CONVENTIONS (random positive entries); (tensors, real values)."""
    rng = np.random.default_rng(seed)
    tensors, values = plain(), rest()
    for k, name in enumerate(QUANTIZED):
        spelling, shape = CONVENTIONS[k % len(CONVENTIONS)]
        w = weights[name]
        if shape is None:
            codes, scale = block_quantize(w, fmt, SQUARE)
            values[name] = real(codes, scale, SQUARE)
        else:
            scale = (rng.uniform(0.5, 2.0, size=shape(w.shape[0])) * np.abs(w).max() / 100).astype(np.float32)
            column = scale.astype(np.float64).reshape(-1, 1)  # (m, 1) or (1, 1): broadcast over columns
            codes = torch.from_numpy(w / column).to(FORMATS[fmt][0])
            values[name] = codes.double().numpy() * column
        tensors[name] = codes
        tensors[spelling.format(name=name, module=name.rsplit(".", 1)[0])] = torch.from_numpy(
            np.asarray(scale)
        )
    return tensors, values


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_tensor_and_per_channel_scales(models, fmt):
    root = models["root"] / f"conventions-{fmt}"
    moved = {n: w * (1 + 0.01 * (np.arange(w.size).reshape(w.shape) % 7 == 0)) for n, w in WEIGHTS.items()}
    b_tensors, b_values = conventional(WEIGHTS, fmt, seed=1)
    t_tensors, t_values = conventional(moved, fmt, seed=2)
    base, target = write(root / "base", b_tensors), write(root / "target", t_tensors)
    doc = pair(base, target)
    assert counts(doc) == expected(b_values, t_values) and counts(doc)[0] > 0
    note = next(n for n in doc["notes"] if n.startswith(str(base)))
    for layout in (
        "per tensor, scale",
        "per tensor, weight_scale",
        "per channel, scale",
        "per channel, weight_",
    ):
        assert layout in note
    assert "block 32×32 inferred, weight_scale_inv" in note
    # exact: the float64 values the test computed, saved as F64, equal the fp8 checkpoint's
    exact = write(root / "f64", {**plain(), **{n: torch.from_numpy(b_values[n]) for n in QUANTIZED}})
    same = pair(exact, base)
    assert counts(same) == [0] * len(TAUS)
    assert {tuple(r["dtypes"]) for r in same["tensors"] if "dtypes" in r} == {("F64", fmt)}


# --- (d) bf16 base, fp8 target --------------------------------------------------------------------
def test_bf16_base_against_fp8_target(models):
    values = models["values"]
    b = {n: ref.load(models["bf16"])[n] for n in WEIGHTS}
    doc = pair(models["bf16"], models["base"])
    assert counts(doc) == expected(b, values["base"]) and counts(doc)[0] > 0
    (warning,) = [w for w in doc["warnings"] if w["code"] == "dtype_change"]
    assert "base BF16, target F8_E4M3" in warning["message"]
    assert warning["message"].startswith(f"{len(QUANTIZED)} tensors")
    rows = {r["source"]: r for r in doc["tensors"]}
    for n in QUANTIZED:
        assert rows[n]["dtype"] == "BF16" and rows[n]["dtypes"] == ["BF16", "F8_E4M3"]
    fp8_rows = pair(models["base"], models["rescaled"], taus=[0.0])["tensors"]
    assert {r["dtype"] for r in fp8_rows if r["source"] in QUANTIZED} == {"F8_E4M3"}
    assert not any("dtypes" in r for r in fp8_rows)


# --- (e) scales are not weights ------------------------------------------------------------------
def test_scales_left_out_and_named_in_notes(models):
    c = open_checkpoint(models["rescaled"])
    assert sorted(c.names()) == sorted(WEIGHTS)
    assert {c.meta(n).stored for n in QUANTIZED} == {"F8_E4M3"} and c.meta(QUANTIZED[0]).dtype == "F64"
    assert np.array_equal(c.array(QUANTIZED[0]), models["values"]["rescaled"][QUANTIZED[0]])
    doc = pair(models["base"], models["rescaled"], taus=[0.0])
    listed = {r["source"] for r in doc["tensors"]} | {
        n if isinstance(n, str) else n["name"] for names in doc["skipped"].values() for n in names
    }
    assert not any("scale" in n for n in listed)
    n = len(QUANTIZED)
    assert f"{models['rescaled']}: {n} fp8 weights (F8_E4M3) dequantized as code × scale " in "\n".join(
        doc["notes"]
    )
    scales = f"{2 * n} scale tensors not analysed ({n} input_scale, {n} weight_scale_inv)"
    assert f"(block 32×24, weight_scale_inv); {scales}" in "\n".join(doc["notes"])


def test_fp8_without_scale_compares_values(models):
    """Unscaled fp8 reads as its fp8 value: +0 and -0 are equal codes apart, other codes by value."""
    root = models["root"] / "unscaled"
    codes = {n: c.clone() for n, c in models["codes"]["base"].items()}
    codes[QUANTIZED[0]].view(torch.uint8).reshape(-1)[:5] = 0x00  # +0
    target = bump(codes, 11, seed=9)
    target[QUANTIZED[0]].view(torch.uint8).reshape(-1)[:5] = 0x80  # -0: another code, the same value
    base = write(root / "base", {**plain(), **codes})
    target_dir = write(root / "target", {**plain(), **target})
    doc = pair(base, target_dir, taus=[0.0, 1e-3])
    b = {n: codes[n].double().numpy() for n in QUANTIZED}
    t = {n: target[n].double().numpy() for n in QUANTIZED}
    assert counts(doc) == expected(b, t, [0.0, 1e-3]) and counts(doc)[0] == 11
    assert (
        sum(int((codes[n].view(torch.uint8) != target[n].view(torch.uint8)).sum()) for n in QUANTIZED) == 16
    )
    assert f"{base}: {len(QUANTIZED)} fp8 tensors without a scale read as their fp8 values" in doc["notes"]


# --- (f) bad scales -------------------------------------------------------------------------------
def test_bad_scale_grid_exits_2_naming_the_tensor(models):
    codes, scales = quantized()
    name = "model.layers.0.mlp.gate_proj.weight"  # [80, 64]: 3×3 blocks of 32×24
    bad = deepseek(codes, scales) | {name + "_scale_inv": torch.ones(2, 2)}
    folder = write(models["root"] / "bad-grid", bad, fp8_config())
    proc = run_cli("analyze", models["base"], folder)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert str(folder / "model.safetensors") in line and repr(name + "_scale_inv") in line
    assert "[2, 2]" in line and "expected [3, 3]" in line and "weight_block_size" in line


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"_scale_inv": torch.ones(6, 2)}, "blocks 32×32 (inferred) (expected [3, 2])"),  # from the others
        ({"_scale_inv": torch.ones(2, 2)}, "blocks 32×32 (inferred) (expected [3, 2])"),
        ({"_scale_inv": torch.ones(3, 2, 1)}, "fits no scale layout"),
        ({"_scale_inv": torch.ones(3, 2, dtype=torch.int32)}, "is I32; a scale must be one of"),
        ({"_scale_inv": torch.ones(3, 2), "_scale": torch.ones(1)}, "has two scales"),
    ],
)
def test_bad_scales_refused(models, change, problem, tmp_path):
    codes, scales = quantized(block=SQUARE)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = deepseek(codes, scales) | {name + suffix: t for suffix, t in change.items()}
    with pytest.raises(InputError, match=re.escape(problem)) as info:
        open_checkpoint(write(tmp_path / "bad", tensors))
    assert name in str(info.value)


def test_bad_block_size_in_config(models, tmp_path):
    codes, scales = quantized()
    config = {**CONFIG, "quantization_config": {"weight_block_size": [32, 0]}}
    with pytest.raises(InputError, match="weight_block_size must be two positive integers"):
        open_checkpoint(write(tmp_path / "bad", deepseek(codes, scales), config))


def test_opening_reads_headers_only(models):
    """The API opens checkpoints (registration) and never imports torch: neither does dequantize."""
    code = (
        "import sys\n"
        "from deltalens.worker.checkpoint import open_checkpoint\n"
        f"c = open_checkpoint({str(models['planted'])!r})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(len(c.names()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(WEIGHTS)


def test_nan_code_refused_naming_the_tensor(models, tmp_path):
    codes, scales = quantized()
    name = QUANTIZED[3]
    codes = {**codes, name: codes[name].clone()}
    codes[name].view(torch.uint8).reshape(-1)[7] = 0x7F  # E4M3 NaN
    folder = write(tmp_path / "nan", deepseek(codes, scales), fp8_config())
    with pytest.raises(InputError, match=re.escape(f"tensor {name!r} holds 1 NaN")) as info:
        pair(models["base"], folder)
    assert info.value.path == str(folder)


def test_stacked_experts_with_block_grids(tmp_path):
    """A 3-D fp8 tensor [E, m, n] with its scale grid [E, gm, gn] (blocks of 16×16 from config.json,
    ragged both ways): compared per expert (the engine's `name[e]` rows)."""
    rng = np.random.default_rng(3)
    name, block = "model.layers.0.mlp.experts.down_proj", (16, 16)
    w = rng.normal(size=(3, 40, 56))
    folders, values = {}, {}
    for label, weights, k in (("base", w, 0), ("target", w + (rng.random(w.shape) < 0.05) * 0.3, 1)):
        pairs = [block_quantize(x, "F8_E5M2", block) for x in weights]
        codes = torch.stack([c for c, _ in pairs])
        scales = np.stack([s for _, s in pairs]) * np.float32(2.0**k)  # other scales: other values
        values[label] = np.stack([real(c, s, block) for c, s in zip(codes, scales)])
        tensors = {name: codes, name + "_scale_inv": torch.from_numpy(scales)}
        folders[label] = write(
            tmp_path / label, tensors, {"quantization_config": {"weight_block_size": [16, 16]}}
        )
    doc = pair(folders["base"], folders["target"])
    rows = {r["name"]: r for r in doc["tensors"]}
    assert sorted(rows) == [f"{name}[{e}]" for e in range(3)]
    for e in range(3):
        b, t = values["base"][e], values["target"][e]
        assert [c["count"] for c in rows[f"{name}[{e}]"]["changed"]] == [
            ref.changed(b, t, tau) for tau in TAUS
        ]
        assert rows[f"{name}[{e}]"]["dtype"] == "F8_E5M2"
    assert doc["notes"][0].endswith(
        ": 1 fp8 weights (F8_E5M2) dequantized as code × scale (block 16×16, down_proj_scale_inv); "
        "1 scale tensors not analysed (1 down_proj_scale_inv)"
    )
