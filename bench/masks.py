"""Benchmark: `series` and `overlap` — read floor, engine and the torch-kernel engine side by side, one run.

    python bench/masks.py [--quick] [--layers N] [--repeat 3]

Generates (once, cached in bench/.data/) one Qwen2-0.5B-shaped bfloat16 base and four RL-like
checkpoints (bench/pair.py's update: a quarter of each matrix's weights move by 1e-6..1e-3). Then,
each in a fresh process with a warm page cache, interleaved (every row once, then again):
  read:   `dd bs=16M` of every shard of every checkpoint involved — the floor for any tool
  engine: `deltalens series BASE C1 C2 C3 C4` / `deltalens overlap BASE R1 R2 R3` (one-pass C kernel)
  torch:  the same with the torch MaskAccumulator (worker.fused_masks.AVAILABLE set False)
and prints the median of --repeat (the torch row runs once: it is tens of times slower), peak RSS,
engine/read against the target (<= 3x), torch/engine, whether both engines' documents agree, and
the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from density import QUICK_LAYERS, load  # noqa: E402
from pair import ROOT, SHAPES, generate, read_cmd, rl_update, run_child, shapes  # noqa: E402

ANALYSES = {"series": 4, "overlap": 3}  # checkpoints after the base
TARGET = 3.0  # engine <= 3x read
COLUMNS = [("analysis", 9), ("GB read", 8), ("read s", 7), ("engine s", 9), ("torch s", 8)]
COLUMNS += [("engine RSS MiB", 15), ("engine/read", 12), ("torch/engine", 13)]
TORCH = (  # the CLI with the torch kernel for series and overlap
    "import runpy; from deltalens.worker import fused_masks; fused_masks.AVAILABLE = False; "
    "runpy.run_module('deltalens.worker.cli', run_name='__main__')"
)


def engine_cmd(kind: str, dirs: list[Path], out: Path, torch_kernel: bool = False) -> list[str]:
    """`deltalens series|overlap BASE ...` writing its JSON to out; torch_kernel: without the C kernel."""
    head = [sys.executable, "-c", TORCH] if torch_kernel else [sys.executable, "-m", "deltalens.worker.cli"]
    return [*head, kind, *map(str, dirs), "--device", "cpu", "--quiet", "--json", str(out)]


def same(a: Path, b: Path) -> bool:
    """The two documents agree: counts exactly, floats to 1e-9 (sums in another order)."""

    def close(x, y) -> bool:
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(map(close, x, y))
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-9) or x == y
        return x == y

    drop = ("device", "elapsed", "timing")
    docs = [{k: v for k, v in json.loads(p.read_text()).items() if k not in drop} for p in (a, b)]
    return close(*docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_LAYERS} decoder layers")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 24)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    c = SHAPES["qwen2-0.5b"]
    layers = args.layers or (QUICK_LAYERS if args.quick else c["layers"])
    data = ROOT / "bench" / ".data" / f"qwen2-0.5b-masks-{layers}l"
    base, *ckpts = generate(data, c, layers, {f"step{k}": rl_update for k in range(1, 5)})
    out = data / "out"
    out.mkdir(exist_ok=True)
    runs, sizes = {}, {}
    for kind, n in ANALYSES.items():
        dirs = [base, *ckpts[:n]]
        files = sorted(f for d in dirs for f in d.glob("*.safetensors"))
        sizes[kind] = sum(f.stat().st_size for f in files) / 1e9
        runs[kind] = {
            "read": read_cmd(files),
            "engine": engine_cmd(kind, dirs, out / f"{kind}-engine.json"),
            "torch": engine_cmd(kind, dirs, out / f"{kind}-torch.json", torch_kernel=True),
        }
    for f in sorted(data.glob("*/*.safetensors")):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    before = load()
    times = {k: {r: [] for r in v} for k, v in runs.items()}
    for round in range(args.repeat):
        for kind, rows in runs.items():
            for row, cmd in rows.items():
                if row != "torch" or not round:  # the torch kernel is tens of times slower: once
                    times[kind][row].append(run_child(cmd))
    after = load()
    params = sum(math.prod(s) for _, s in shapes(c, layers))
    print(
        f"qwen2-0.5b-shaped bf16 checkpoints: {layers} layers, {params / 1e6:,.0f}M parameters each; "
        f"{os.cpu_count()} CPU cores; median of {args.repeat} (process start included); "
        f"{before} before, {after} after"
    )
    print(" ".join(f"{h:>{w}}" for h, w in COLUMNS) + "  documents")
    met = []
    for kind in runs:
        best = {k: (statistics.median(t for t, _ in v), max(r for _, r in v)) for k, v in times[kind].items()}
        ratio = best["engine"][0] / best["read"][0]
        met.append(ratio <= TARGET)
        agree = same(out / f"{kind}-engine.json", out / f"{kind}-torch.json")
        print(
            f"{kind:>9} {sizes[kind]:8.2f} {best['read'][0]:7.2f} {best['engine'][0]:9.2f} "
            f"{best['torch'][0]:8.2f} {best['engine'][1]:15.0f} {ratio:12.2f} "
            f"{best['torch'][0] / best['engine'][0]:13.2f}  {'same' if agree else 'DIFFER'}"
        )
    print(
        f"target: engine <= {TARGET:g}x read: "
        + ", ".join(f"{k} {'met' if m else 'missed'}" for k, m in zip(runs, met))
    )


if __name__ == "__main__":
    main()
