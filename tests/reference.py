"""Independent float64 NumPy reference for every metric (does not use worker.kernels).

Checkpoints are read with the `safetensors` library (not the engine's reader) and every figure
is recomputed here from the definitions in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from deltalens.worker.contract import BIN_EDGES

EPS32 = float(np.finfo(np.float32).eps)


def load(path) -> dict[str, np.ndarray]:
    """name -> float64 array, from a checkpoint dir (single or sharded) or a .safetensors file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted({path / f for f in index["weight_map"].values()})
    else:
        files = [path / "model.safetensors"]
    out = {}
    for f in files:
        out.update({k: v.to(torch.float64).numpy() for k, v in load_file(f).items()})
    return out


def split_parts(name: str, w: np.ndarray, config: dict) -> dict[str, np.ndarray]:
    """The matrices the engine should report for one stored tensor, rows = output features."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    if name.endswith("attn.c_attn.weight"):  # GPT-2 Conv1D (in, 3*out)
        q, k, v = np.split(w.T, 3, axis=0)
        return {f"{name}[q]": q, f"{name}[k]": k, f"{name}[v]": v}
    if name.endswith("attn.c_attn.bias"):
        q, k, v = np.split(w, 3)
        return {f"{name}[q]": q, f"{name}[k]": k, f"{name}[v]": v}
    if any(name.endswith(s) for s in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
        return {name: w.T}
    if "query_key_value" in name:  # NeoX: per head [q k v]
        rest = w.shape[1:]
        per_head = w.reshape(heads, 3, -1, *rest)
        return {f"{name}[{m}]": per_head[:, i].reshape(-1, *rest) for i, m in enumerate("qkv")}
    if name.endswith("qkv_proj.weight"):  # Phi-3: [q | k | v] rows
        hd = config["hidden_size"] // heads
        kv = config.get("num_key_value_heads") or heads
        q, k = heads * hd, kv * hd
        return {f"{name}[q]": w[:q], f"{name}[k]": w[q : q + k], f"{name}[v]": w[q + k :]}
    if name.endswith("gate_up_proj.weight"):
        gate, up = np.split(w, 2, axis=0)
        return {f"{name}[gate]": gate, f"{name}[up]": up}
    return {name: w}


def changed(b: np.ndarray, t: np.ndarray, tau: float, relative: bool = False) -> int:
    d = np.abs(t - b)
    return int((d > tau * np.abs(b)).sum() if relative else (d > tau).sum())


def histogram(values: np.ndarray) -> list[int]:
    """Counts in bins [0], (0,E0], (E0,E1], ..., (E_last, inf]."""
    v = np.asarray(values, dtype=np.float64).ravel()
    edges = np.asarray(BIN_EDGES, dtype=np.float64)
    counts = np.zeros(len(edges) + 2, dtype=np.int64)
    counts[0] = int((v == 0).sum())
    nonzero = v[v != 0]
    np.add.at(counts, np.searchsorted(edges, nonzero, side="left") + 1, 1)
    return counts.tolist()


def relative_values(b: np.ndarray, t: np.ndarray) -> np.ndarray:
    d = np.abs(t - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = d / np.abs(b)
    r[d == 0] = 0.0
    return r


def spectrum(d: np.ndarray) -> dict:
    m, n = d.shape
    s = np.linalg.svd(d, compute_uv=False)
    if s[0] == 0:
        return dict(rank=0, full_rank=min(m, n), effective_rank=0.0, stable_rank=0.0, rank90=0, rank99=0)
    tol = s[0] * max(m, n) * EPS32
    p = s[s > 0] / s.sum()
    energy = np.cumsum(s**2) / np.sum(s**2)
    return dict(
        rank=int((s > tol).sum()),
        full_rank=min(m, n),
        effective_rank=float(np.exp(-(p * np.log(p)).sum())),
        stable_rank=float((s**2).sum() / s[0] ** 2),
        rank90=int(np.argmax(energy >= 0.9) + 1),
        rank99=int(np.argmax(energy >= 0.99) + 1),
        sigma=s,
    )


def update_map(mask: np.ndarray, heads: int | None = None, heads_on_rows: bool = True) -> dict:
    m, n = mask.shape
    gr, gc = min(64, m), min(64, n)
    rb = [i * m // gr for i in range(gr + 1)]
    cb = [j * n // gc for j in range(gc + 1)]
    cells = np.array(
        [[mask[rb[i] : rb[i + 1], cb[j] : cb[j + 1]].mean() for j in range(gc)] for i in range(gr)]
    )
    out = dict(grid_rows=gr, grid_cols=gc, cells=cells.ravel(), rows=mask.sum(1), cols=mask.sum(0))
    if heads:
        axis = mask if heads_on_rows else mask.T
        out["head_frac"] = np.array([blk.mean() for blk in np.split(axis, heads, axis=0)])
    return out


def overlap(masks: list[np.ndarray]) -> dict:
    n = masks[0].size
    sizes = [int(m.sum()) for m in masks]
    pairs = []
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            both = int((masks[a] & masks[b]).sum())
            pairs.append(
                dict(
                    a=a,
                    b=b,
                    both=both,
                    o1=both / sizes[a],
                    o2=both / sizes[b],
                    baseline1=sizes[b] / n,
                    baseline2=sizes[a] / n,
                    jaccard=both / int((masks[a] | masks[b]).sum()),
                )
            )
    venn = {}
    if len(masks) <= 3:
        for code in range(1, 1 << len(masks)):
            region = np.ones(masks[0].shape, bool)
            for k, mk in enumerate(masks):
                region &= mk if code >> k & 1 else ~mk
            venn["".join("1" if code >> k & 1 else "0" for k in range(len(masks)))] = int(region.sum())
    return dict(changed=sizes, pairs=pairs, venn=venn)


def series(masks: list[np.ndarray]) -> dict:
    final = masks[-1]
    union = np.zeros_like(final)
    for mk in masks:
        union |= mk
    steps = [dict(changed=int(mk.sum()), outside_final=int((mk & ~final).sum())) for mk in masks]
    for s in steps:
        s["transient_fraction"] = s["outside_final"] / s["changed"] if s["changed"] else None
    return dict(
        steps=steps,
        categories=dict(
            consistent=int(final.sum()),
            transient=int((union & ~final).sum()),
            untouched=int(final.size - union.sum()),
        ),
    )


def relative_l2(b: np.ndarray, t: np.ndarray) -> float:
    return math.sqrt(((t - b) ** 2).sum()) / math.sqrt((b**2).sum())
