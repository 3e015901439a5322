"""Benchmark: `pair` at every update density — read floor, engine and naive loop side by side, one run.

    python bench/density.py [--quick] [--layers N] [--repeat 3] [--other-kernel OLD.so]
    python bench/density.py --kernel [--repeat 9] [--other-kernel OLD.so]

Generates (once, cached in bench/.data/) one Qwen2-0.5B-shaped bfloat16 base and one target per
density, in which a share (~10 %, ~50 %, ~100 %) of every tensor's stored values move by 2^-7 ..
2^-2 of their size (so each chosen value changes: 1 to ~64 ULPs). Then, per density and each in a
fresh process with a warm page cache, the rows of bench/pair.py:
  read:   `dd bs=16M` of every shard of both checkpoints to /dev/null — the floor for any tool
  engine: `deltalens analyze BASE TARGET --no-rank --no-geometry` (every one-pass figure)
  naive:  load both state dicts fully, then `(t.float() - b.float()).abs() > τ` per tensor
Runs interleave (every density's rows once, then again) so load from other processes hits all
alike; it prints the median of --repeat, peak RSS, the ratios against the targets (engine <= 3x read,
naive >= 5x engine, peak RSS <= 1.2 GiB) and the machine's load average before and after.
--other-kernel adds one more row, interleaved with the others: the engine with another build of
worker/_fastpair.c (same pair_rows signature), for an old/new kernel ratio under the same load.
--kernel times the kernel alone instead: one 4864×896 bf16 matrix (an MLP projection's shape) at
0 / 10 / 50 / 100 % moved, in this process on one thread, as thread CPU time (robust to other
load), best of --repeat, with --other-kernel interleaved and its figures checked equal.
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
from pair import ROOT, SHAPES, engine_cmd, generate, naive_cmd, read_cmd, run_child, shapes  # noqa: E402

DENSITIES = {"10%": 0.1, "50%": 0.5, "100%": 1.0}  # share of stored values changed
TARGETS = {"engine/read": 3.0, "naive/engine": 5.0, "rss_gib": 1.2}
QUICK_LAYERS = 2
WIDTHS = (8, 8, 7, 9, 8, 15, 12, 13)
KERNEL_SHAPE = (4864, 896)


def dense_update(share: float):
    """update(name, base, generator) -> target: `share` of the values scaled by 1 ± 2^U(-7, -2)."""

    def update(name: str, b, g):
        import torch

        shape = b.shape
        mask = torch.rand(shape, generator=g) < share
        size = torch.exp2(torch.rand(shape, generator=g) * 5 - 7)
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return (b.float() * (1 + mask * sign * size)).to(torch.bfloat16)

    return update


def other_kernel_cmd(engine: list[str], library: str) -> list[str]:
    """The engine command with fused.pair_rows taken from another build of the kernel."""
    code = (
        "import ctypes, runpy, sys; from deltalens.worker import fused; "
        "f = ctypes.CDLL(sys.argv.pop(1)).pair_rows; "
        "f.argtypes, f.restype = fused._pair_rows.argtypes, None; fused._pair_rows = f; "
        "runpy.run_module('deltalens.worker.cli', run_name='__main__')"
    )
    return [sys.executable, "-c", code, library, *engine[3:]]


def kernel_alone(repeat: int, other: str | None) -> None:
    """Thread CPU time of FusedPairAccumulator on one matrix, per density (see the module doc)."""
    import ctypes
    import time

    import numpy as np
    import torch

    from deltalens.worker import fused
    from deltalens.worker.contract import ULP_FORMATS

    kernels = {"this build": fused._pair_rows}
    if other:
        kernels["other"] = ctypes.CDLL(other).pair_rows
        kernels["other"].argtypes, kernels["other"].restype = fused._pair_rows.argtypes, None
    fused.THREADS, (rows, cols) = 1, KERNEL_SHAPE
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    print(f"kernel alone: {rows}x{cols} bf16, one thread, thread CPU time, best of {repeat}; {load()}")
    for share in (0.0, *DENSITIES.values()):
        t = dense_update(share)("", b, g)
        base, target = (x.view(torch.int16).numpy().view(np.uint16) for x in (b, t))
        best, figures = dict.fromkeys(kernels, math.inf), {}
        for _ in range(repeat):
            for name, kernel in kernels.items():
                fused._pair_rows = kernel
                acc = fused.FusedPairAccumulator(rows, cols, [1e-5], False, True, False, None, False,
                                                 ulp=ULP_FORMATS["BF16"])  # fmt: skip
                start = time.thread_time()
                acc.add(base, [target], 0)
                acc._flush()  # the kernel calls (add may leave them to result())
                best[name] = min(best[name], time.thread_time() - start)
                figures[name] = json.dumps(acc.result())
        line = "  ".join(f"{k} {v * 1e3:6.2f} ms" for k, v in best.items())
        if other:
            same = "same" if figures["other"] == figures["this build"] else "DIFFER"
            line += f"  other/this {best['other'] / best['this build']:.2f}, figures {same}"
        print(f"{share:5.0%} moved: {line}")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_LAYERS} decoder layers (about 2 minutes)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 24)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--other-kernel", metavar="SO", help="also time the engine with this kernel build")
    ap.add_argument("--kernel", action="store_true", help="time the kernel alone (thread CPU time)")
    args = ap.parse_args()
    if args.kernel:
        kernel_alone(args.repeat, args.other_kernel)
        return
    c = SHAPES["qwen2-0.5b"]
    layers = args.layers or (QUICK_LAYERS if args.quick else c["layers"])
    data = ROOT / "bench" / ".data" / f"qwen2-0.5b-density-{layers}l"
    base, *targets = generate(
        data, c, layers, {f"target-{k[:-1]}": dense_update(v) for k, v in DENSITIES.items()}
    )
    out = data / "out"
    out.mkdir(exist_ok=True)
    runs, sizes = {}, {}
    for (label, _), target in zip(DENSITIES.items(), targets):
        files = sorted([*base.glob("*.safetensors"), *target.glob("*.safetensors")])
        sizes[label] = sum(f.stat().st_size for f in files) / 1e9
        runs[label] = {
            "read": read_cmd(files),
            "engine": engine_cmd(base, target, out / f"engine-{label[:-1]}.json", False),
            "naive": naive_cmd(base, target, out / f"naive-{label[:-1]}.txt", False),
        }
        if args.other_kernel:
            other = engine_cmd(base, target, out / f"other-{label[:-1]}.json", False)
            runs[label]["other"] = other_kernel_cmd(other, args.other_kernel)
    for f in sorted(data.glob("*/*.safetensors")):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    before = load()
    times = {d: {k: [] for k in r} for d, r in runs.items()}
    for _ in range(args.repeat):
        for d, r in runs.items():
            for k, cmd in r.items():
                times[d][k].append(run_child(cmd))
    after = load()
    params = sum(math.prod(s) for _, s in shapes(c, layers))
    print(
        f"qwen2-0.5b-shaped bf16 pairs: {layers} layers, {params / 1e6:,.0f}M parameters, "
        f"{sizes['10%']:.2f} GB read per pair; {os.cpu_count()} CPU cores; median of {args.repeat} "
        f"(process start included); {before} before, {after} after"
    )
    head = (
        "density",
        "moved",
        "read s",
        "engine s",
        "naive s",
        "engine RSS MiB",
        "engine/read",
        "naive/engine",
    )
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, WIDTHS)) + "  count at τ=1e-5")
    met = []
    for d in runs:
        best = {k: (statistics.median(t for t, _ in v), max(r for _, r in v)) for k, v in times[d].items()}
        doc = json.loads((out / f"engine-{d[:-1]}.json").read_text())
        changed = doc["summary"]["changed"][0]["count"]
        ulp = doc["summary"]["precision"]["ulp_hist"]  # [0]: stored value unchanged
        naive = int((out / f"naive-{d[:-1]}.txt").read_text())
        ratio_read, ratio_naive = best["engine"][0] / best["read"][0], best["naive"][0] / best["engine"][0]
        rss = best["engine"][1]
        met.append(
            ratio_read <= TARGETS["engine/read"]
            and ratio_naive >= TARGETS["naive/engine"]
            and rss <= TARGETS["rss_gib"] * 1024
        )
        print(
            f"{d:>8} {1 - ulp[0] / sum(ulp):8.1%} {best['read'][0]:7.2f} {best['engine'][0]:9.2f} "
            f"{best['naive'][0]:8.2f} {rss:15.0f} {ratio_read:12.2f} {ratio_naive:13.2f}  "
            + ("same" if changed == naive else f"naive {naive - changed:+d} (float32 subtraction rounds)")
        )
        if "other" in best:
            other, doc = best["other"][0], json.loads((out / f"other-{d[:-1]}.json").read_text())
            same = doc["summary"]["changed"][0]["count"] == changed
            print(f"{'':>8} other kernel {other:.2f} s, other/engine {other / best['engine'][0]:.2f}, count "
                  + ("same" if same else "differs"))  # fmt: skip
    print(
        f"targets: engine <= {TARGETS['engine/read']:g}x read, >= {TARGETS['naive/engine']:g}x faster "
        f"than naive, peak RSS <= {TARGETS['rss_gib']} GiB: "
        + ", ".join(f"{d} {'met' if m else 'missed'}" for d, m in zip(runs, met))
    )


if __name__ == "__main__":
    main()
