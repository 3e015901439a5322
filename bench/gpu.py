"""Benchmark: the GPU path end to end on a Llama-8B-shaped bf16 pair — runnable as is on any CUDA machine.

    python bench/gpu.py [--shape llama-8b] [--layers N] [--device cuda:0]

Generates (once, cached in bench/.data/, ~32 GB for the full 8B pair) the same RL-like pair as
bench/pair.py, warms the page cache, then runs in-process:
  pass:  the pair pass without rank (histograms, both modes, maps), tensors prefetched through
         pinned memory on a side stream while the previous one is computed
  rank:  the same with rank, full singular spectra and energy ranks of every matrix
         (float64 Gram matrix Δᵀ Δ, eigvalsh on the GPU)
and prints seconds, GB/s of checkpoint data, peak GPU memory and the time spent on rank.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pair import SHAPES, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "bench/gpu.py: no CUDA device here; run it on a GPU machine (the CPU figures are bench/pair.py)"
        )
        return
    from deltalens.worker.analyses import Options, run_analysis

    c = SHAPES[args.shape]
    layers = args.layers or c["layers"]
    data = ROOT / "bench" / ".data" / (args.shape + (f"-{layers}l" if layers != c["layers"] else ""))
    base, target = generate(data, c, layers)
    files = sorted([*base.glob("*.safetensors"), *target.glob("*.safetensors")])
    gb = sum(f.stat().st_size for f in files) / 1e9
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    read_start = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    read = time.perf_counter() - read_start
    times = {}
    for label, rank in (("pass", False), ("rank", True)):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        doc = run_analysis("pair", [str(base), str(target)], Options(rank=rank, device=args.device)).document
        torch.cuda.synchronize()
        times[label] = (time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30)
    name = torch.cuda.get_device_name(args.device)
    print(
        f"{args.shape}-shaped bf16 pair: {layers} layers, {gb:.1f} GB read, {len(doc['tensors'])} "
        f"matrices; {name}"
    )
    print(f"{'':6} {'wall s':>8} {'GB/s':>7} {'peak GPU GiB':>13}")
    print(f"{'read':6} {read:8.2f} {gb / read:7.2f} {'':>13}")
    for label, (t, mem) in times.items():
        print(f"{label:6} {t:8.2f} {gb / t:7.2f} {mem:13.2f}")
    print(
        f"rank + spectra of every matrix: {times['rank'][0] - times['pass'][0]:.1f} s on top of the pass; "
        f"changed at τ=1e-5: {doc['summary']['changed'][0]['count']:,}"
    )


if __name__ == "__main__":
    main()
