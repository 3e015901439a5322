"""Benchmark: what rank and geometry add to `pair`, against the BLAS floor — side by side, one run.

    python bench/rank.py [--layers N] [--repeat 3] [--embed] [--quick]

Qwen2-0.5B-shaped matrices, each decoder layer's q (896×896), k and v (128×896), o (896×896), gate
and up (4864×896), down (896×4864) and, with --embed, the 151936×896 embedding: a random bf16 W₀ and
an RL-like update (a quarter of the weights move by 1e-6..1e-3), in memory as the pair pass holds
them. Per matrix, interleaved and best of --repeat:
  floor:    the float64 Gram of Δ on its smaller side (NumPy hands A·Aᵀ to BLAS as DSYRK) and
            eigvalsh, from a float64 Δ made beforehand (not timed) — the least any exact rank costs
  rank:     what the pass adds for rank: Spectrum fed the bf16 row chunks as the fused kernel feeds
            it (bf16 → float64 included), then the singular values and the spectrum figures
  geometry: geometry.of_part on the same matrices, σ₁(ΔW) from the rank's spectrum, as the pass does
and prints the totals per matrix type and the ratios against the targets of issue 14:
rank ≤ 1.5 × floor, geometry ≤ 2 × rank, with the load average (other processes share the cores),
then the same ratios in process CPU seconds (all threads; steadier than wall time under load).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np
import torch

from deltalens.worker import geometry
from deltalens.worker.metrics import Spectrum, delta64, spectrum_metrics

HIDDEN, KV, INTER, VOCAB, LAYERS = 896, 128, 4864, 151936, 24  # Qwen2-0.5B's config
LAYER = {
    "q": (HIDDEN, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate": (INTER, HIDDEN),
    "up": (INTER, HIDDEN),
    "down": (HIDDEN, INTER),
}
CHUNK = 1 << 20  # elements per row chunk, as the fused pass reads them
TAU = 1e-5
TARGETS = {"rank": ("floor", 1.5), "geometry": ("rank", 2.0)}


def bf16_pair(shape: tuple[int, int], gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(W₀, W₁) as the readers hand bf16 to the fused pass: uint16 bits."""
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    moved = torch.rand(shape, generator=gen) < 0.25
    step = torch.randn(shape, generator=gen) * 10 ** (torch.rand(shape, generator=gen) * 3 - 6)
    target = (base.float() + step * moved).to(torch.bfloat16)
    return tuple(x.view(torch.int16).numpy().view(np.uint16) for x in (base, target))


def floor(delta: np.ndarray) -> None:
    gram = delta.T @ delta if delta.shape[0] >= delta.shape[1] else delta @ delta.T
    np.linalg.eigvalsh(gram)


def rank(base: np.ndarray, target: np.ndarray) -> dict:
    rows, cols = base.shape
    spectrum = Spectrum(rows, cols, np)
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        spectrum.add_pair(base[r : r + step], target[r : r + step])
    return spectrum_metrics(spectrum.singular_values(), rows, cols)


def timed(fn, *args) -> tuple[tuple[float, float], object]:
    """((wall, process CPU) seconds, fn's result)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return (time.perf_counter() - start, time.process_time() - cpu), out


def measure(matrices: list[tuple[str, np.ndarray, np.ndarray]], repeat: int) -> dict[str, dict[str, float]]:
    """Best seconds per matrix and kind, summed per matrix type: {type: {floor, rank, geometry}}, wall
    time, and the same keys + " cpu" for process CPU time."""
    best: dict[tuple[int, str], float] = defaultdict(lambda: float("inf"))
    figures: dict[int, dict] = {}  # the rank's figures per matrix: σ₁ for geometry (rank runs first once)
    for rep in range(repeat):
        for i, (_, base, target) in enumerate(matrices):
            delta = delta64(base, target)
            kinds = ["floor", "rank", "geometry"]
            for kind in kinds[rep % 3 :] + kinds[: rep % 3]:  # rotate: no kind always runs first
                if kind == "floor":
                    seconds, _ = timed(floor, delta)
                elif kind == "rank":
                    seconds, figures[i] = timed(rank, base, target)
                else:
                    part = ([base, target], ((0, len(base)),), TAU, False, figures[i])
                    seconds, _ = timed(geometry.of_part, *part)
                best[i, kind] = min(best[i, kind], seconds[0])
                best[i, f"{kind} cpu"] = min(best[i, f"{kind} cpu"], seconds[1])
            del delta
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (i, kind), seconds in best.items():
        totals[matrices[i][0]][kind] += seconds
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--embed", action="store_true", help="add the 151936×896 embedding (rank only)")
    ap.add_argument("--quick", action="store_true", help="2 layers, no embedding (~2 min here)")
    args = ap.parse_args()
    layers = 2 if args.quick else args.layers
    gen = torch.Generator().manual_seed(0)
    matrices = [(m, *bf16_pair(shape, gen)) for _ in range(layers) for m, shape in LAYER.items()]
    if args.embed and not args.quick:
        matrices.append(("embed", *bf16_pair((VOCAB, HIDDEN), gen)))
    load0 = os.getloadavg()
    totals = measure(matrices, args.repeat)
    load1 = os.getloadavg()
    params = sum(b.size for _, b, _ in matrices)
    embed = " + embedding" if matrices[-1][0] == "embed" else ""
    print(
        f"qwen2-0.5b-shaped matrices: {layers} layers{embed}, {len(matrices)} matrices, "
        f"{params / 1e6:,.0f}M weights; {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}; best of {args.repeat}, seconds"
    )
    print(f"{'matrix':8} {'floor':>8} {'rank':>8} {'geometry':>9} {'rank/floor':>11} {'geom/rank':>10}")
    kinds = ("floor", "rank", "geometry")
    every = (*kinds, *(f"{k} cpu" for k in kinds))
    rows = [*totals.items(), ("all", {k: sum(t[k] for t in totals.values()) for k in every})]
    for name, t in rows:
        print(
            f"{name:8} {t['floor']:8.2f} {t['rank']:8.2f} {t['geometry']:9.2f} "
            f"{t['rank'] / t['floor']:11.2f} {t['geometry'] / t['rank']:10.2f}"
        )
    everything = rows[-1][1]
    for kind, (against, target) in TARGETS.items():
        ratio = everything[kind] / everything[against]
        verdict = "met" if ratio <= target else f"missed by {ratio / target:.2f}x"
        cpu = everything[f"{kind} cpu"] / everything[f"{against} cpu"]
        print(f"{kind}: {ratio:.2f}x {against} (target <= {target}x): {verdict}; CPU time {cpu:.2f}x")
    before, after = (tuple(round(x, 1) for x in load) for load in (load0, load1))
    print(f"load average (1, 5, 15 min): before {before}, after {after}")


if __name__ == "__main__":
    main()
