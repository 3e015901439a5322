"""Benchmark: deltalens `pair` against what a researcher would otherwise run — side by side, one run.

    python bench/pair.py [--shape qwen2-0.5b|llama-8b] [--layers N] [--repeat 2] [--no-rank-baseline]

Generates (once, cached in bench/.data/) a bfloat16 base/target pair shaped like the real model,
sharded like HF (~2 GB shards, index), where RL-like updates move a share of each matrix's
weights (norms almost untouched). Then, each in a fresh process, with a warm page cache:
  cat:         `cat` every shard of both checkpoints to /dev/null (GNU cat hands the copy to the
               kernel, which skips the data for /dev/null: this row moves no bytes)
  read:        read(2) every byte of every shard into memory (`dd bs=16M`) — the floor for any tool
  engine:      `deltalens analyze BASE TARGET --no-rank --no-geometry` (counts, histograms, both
               modes, maps, norms — every one-pass figure)
  engine, no Δ: the same on BASE against itself: the scan alone, when no weight moved
  naive:       load both state dicts fully, then `(t.float() - b.float()).abs() > τ` per tensor
  engine+rank: the same with rank and geometry: full singular spectra, energy ranks, subspaces
  naive+rank:  the naive loop plus `torch.linalg.matrix_rank` of every 2-D Δ (rank only)
and prints wall time, throughput (GB of checkpoint read per second), peak RSS and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # Hugging Face configs of the real models (bias: Qwen2 has q/k/v biases)
    "qwen2-0.5b": dict(
        vocab=151936,
        hidden=896,
        inter=4864,
        layers=24,
        heads=14,
        kv_heads=2,
        bias=True,
        tied=True,
        model_type="qwen2",
        arch="Qwen2ForCausalLM",
    ),
    "llama-8b": dict(
        vocab=128256,
        hidden=4096,
        inter=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        bias=False,
        tied=False,
        model_type="llama",
        arch="LlamaForCausalLM",
    ),
}
SHARD_BYTES = 2 << 30

NAIVE = r"""
import json, sys, torch
from safetensors.torch import load_file
def load(d):
    index = json.load(open(f"{d}/model.safetensors.index.json"))["weight_map"]
    sd = {}
    for shard in sorted(set(index.values())):
        sd.update(load_file(f"{d}/{shard}"))
    return sd
b, t = load(sys.argv[1]), load(sys.argv[2])
changed = sum(int(((t[k].float() - b[k].float()).abs() > 1e-5).sum()) for k in b)
if RANK:
    ranks = [int(torch.linalg.matrix_rank(t[k].float() - b[k].float())) for k in b if b[k].ndim == 2]
print(changed)
"""


def shapes(c: dict, layers: int):
    h, kv = c["hidden"], c["hidden"] // c["heads"] * c["kv_heads"]
    yield "model.embed_tokens.weight", (c["vocab"], h)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield from [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (c["inter"], h)),
            (p + "mlp.up_proj.weight", (c["inter"], h)),
            (p + "mlp.down_proj.weight", (h, c["inter"])),
        ]
        if c["bias"]:
            yield from [(p + f"self_attn.{m}_proj.bias", (h if m == "q" else kv,)) for m in "qkv"]
    yield "model.norm.weight", (h,)
    if not c["tied"]:
        yield "lm_head.weight", (c["vocab"], h)


def rl_update(name: str, b, g):
    """RL-like target: a quarter of each matrix's weights move by 1e-6..1e-3 (norms almost untouched)."""
    import torch

    norm = "norm" in name
    mask = torch.rand(b.shape, generator=g) < (0.002 if norm else 0.25)
    step = torch.randn(b.shape, generator=g) * 10 ** (torch.rand(b.shape, generator=g) * 3 - 6)
    return (b.float() + step * mask).to(torch.bfloat16)


def generate(root: Path, c: dict, layers: int, targets: dict | None = None) -> tuple[Path, ...]:
    """(base, *targets) folders under root, generated once: one bf16 base and, per entry of targets
    (folder name -> update(name, base tensor, generator) -> target tensor), one target."""
    import torch
    from safetensors.torch import save_file

    targets = targets or {"target": rl_update}
    base_dir, dirs = root / "base", [root / t for t in targets]
    if all((d / "model.safetensors.index.json").exists() for d in dirs):
        return base_dir, *dirs
    print(f"generating a {root.name} bf16 pair in {root} (once) ...", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    config = {
        "model_type": c["model_type"],
        "architectures": [c["arch"]],
        "hidden_size": c["hidden"],
        "intermediate_size": c["inter"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"],
        "num_hidden_layers": layers,
        "vocab_size": c["vocab"],
        "tie_word_embeddings": c["tied"],
        "torch_dtype": "bfloat16",
    }
    shards, size = [[]], 0
    for name, shape in shapes(c, layers):  # HF-style: fill a shard up to ~2 GB, then start the next
        nbytes = 2 * __import__("math").prod(shape)
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    for d in (base_dir, *dirs):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for k, entries in enumerate(shards):
        shard = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        base, moved = {}, {t: {} for t in targets}
        for name, shape in entries:
            norm = "norm" in name
            base[name] = (
                torch.randn(shape, generator=g) * (0.02 if not norm else 0.0) + (1.0 if norm else 0.0)
            ).to(torch.bfloat16)
            for t, update in targets.items():
                moved[t][name] = update(name, base[name], g)
            weight_map[name] = shard
        save_file(base, base_dir / shard, metadata={"format": "pt"})
        for t, d in zip(targets, dirs):
            save_file(moved[t], d / shard, metadata={"format": "pt"})
        del base, moved
    for d in (base_dir, *dirs):
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return base_dir, *dirs


def naive_cmd(base: Path, target: Path, out: Path, rank: bool) -> list[str]:
    """The naive loop in a fresh interpreter; it writes its changed count to out."""
    code = NAIVE.replace("RANK", str(rank)).replace(
        "print(changed)", f"open({str(out)!r}, 'w').write(str(changed))"
    )
    return [sys.executable, "-c", code, str(base), str(target)]


def engine_cmd(base: Path, target: Path, out: Path, rank: bool) -> list[str]:
    """`deltalens analyze` writing its JSON to out; without rank also without geometry (counts,
    histograms, maps, norms: the one-pass figures)."""
    flags = [] if rank else ["--no-rank", "--no-geometry"]
    return [sys.executable, "-m", "deltalens.worker.cli", "analyze", str(base), str(target), "--quiet",
            "--json", str(out), *flags]  # fmt: skip


def read_cmd(files: list[Path]) -> list[str]:
    """read(2) every byte of every file into memory, 16 MiB at a time: the floor for any tool."""
    return ["sh", "-c", 'for f; do dd if="$f" of=/dev/null bs=16M status=none; done', "sh", *map(str, files)]


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process; wait4 reports that child's own rusage."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        # warm caches, as an installed package has them: bytecode too (the first run writes it)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd[:4])} ... failed")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    ap.add_argument(
        "--layers", type=int, default=None, help="decoder layers to generate (default: all of the real model)"
    )
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-rank-baseline", action="store_true", help="skip the two rank runs (slow on CPU)")
    args = ap.parse_args()
    c = SHAPES[args.shape]
    layers = args.layers or c["layers"]
    data = ROOT / "bench" / ".data" / (args.shape + (f"-{layers}l" if layers != c["layers"] else ""))
    base, target = generate(data, c, layers)
    files = sorted([*base.glob("*.safetensors"), *target.glob("*.safetensors")])
    gb = sum(f.stat().st_size for f in files) / 1e9
    out = data / "out"
    out.mkdir(exist_ok=True)
    naive = lambda rank, name: naive_cmd(base, target, out / name, rank)  # noqa: E731
    engine = lambda rank, name: engine_cmd(base, target, out / name, rank)  # noqa: E731
    runs = {
        "cat": ["cat", *map(str, files)],
        "read": read_cmd(files),
        "engine": engine(False, "engine.json"),
        "naive": naive(False, "naive.txt"),
        "engine, no Δ": engine_cmd(base, base, out / "same.json", False),
    }
    if not args.no_rank_baseline:
        runs.update(
            {"engine+rank": engine(True, "engine-rank.json"), "naive+rank": naive(True, "naive-rank.txt")}
        )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    skipped = [
        k for k in runs if k.startswith("naive") and 2.2 * gb * 1e9 > ram
    ]  # both state dicts + float copies
    for f in files:  # warm the page cache (as far as it holds both checkpoints)
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    times: dict[str, list] = {k: [] for k in runs if k not in skipped}
    for _ in range(args.repeat):
        for label in times:
            times[label].append(run_child(runs[label]))
    best = {k: (min(t for t, _ in v), max(r for _, r in v)) for k, v in times.items()}
    params = sum(__import__("math").prod(s) for _, s in shapes(c, layers))
    changed = {"engine": json.loads((out / "engine.json").read_text())["summary"]["changed"][0]["count"]}
    if "naive" in best:
        changed["naive"] = int((out / "naive.txt").read_text())
    print(
        f"{args.shape}-shaped bf16 pair: {layers} layers, {params / 1e6:,.0f}M parameters and "
        f"{len(files) // 2} shards per checkpoint, {gb:.2f} GB read; {os.cpu_count()} CPU cores, "
        f"{ram / 2**30:.0f} GiB RAM; best of {args.repeat} (process start included)"
    )
    print(f"{'':12} {'wall s':>8} {'GB/s':>7} {'peak RSS MiB':>13}  x read   x engine")
    for label, (t, rss) in best.items():
        base_label = "engine+rank" if label.endswith("+rank") else "engine"
        ratio = (
            f"{t / best[base_label][0]:8.2f}"
            if base_label in best and label != base_label and label.startswith("naive")
            else ""
        )
        shown = (
            f"{rss:13.0f}" if label not in ("cat", "read") else f"{'-':>13}"
        )  # a forked child starts at our RSS
        print(f"{label:12} {t:8.2f} {gb / t:7.2f} {shown} {t / best['read'][0]:7.2f}  {ratio}")
    for label in skipped:
        print(
            f"{label:12} not run: both state dicts ({gb:.1f} GB) would not fit in {ram / 2**30:.0f} "
            f"GiB of RAM"
        )
    e = best["engine"][0]
    print(f"engine: {e / best['read'][0]:.2f}x the read cost (target <= 3x)", end="")
    if "naive" in best:
        print(
            f", {best['naive'][0] / e:.2f}x faster than naive (target >= 5x), "
            f"{best['engine'][1] / best['naive'][1]:.2f} of its peak memory",
            end="",
        )
    if "naive+rank" in best:
        print(
            f"; with rank {best['naive+rank'][0] / best['engine+rank'][0]:.2f}x faster than "
            f"naive+matrix_rank "
            f"(target >= 1x) while returning full spectra",
            end="",
        )
    print()
    if "naive" in changed and changed["naive"] != changed["engine"]:
        print(
            f"note: counts differ by {changed['engine'] - changed['naive']}: the naive loop "
            f"subtracts in float32, "
            "which rounds when a tiny weight meets a large one; the engine's float64 Δ is exact"
        )


if __name__ == "__main__":
    main()
