"""Principal geometry of a weight update ΔW = W₁ − W₀ against W₀, and where its update mask falls.

Per 2-D matrix of a pair, computed while the pair pass holds the matrix in memory (no second read):

* energy shares of ΔW inside W₀'s top-k singular subspaces, k ∈ KS capped at min(m, n):
  both-sided ‖U_kᵀ ΔW V_k‖²/‖ΔW‖², left ‖U_kᵀ ΔW‖²/‖ΔW‖², right ‖ΔW V_k‖²/‖ΔW‖²;
* principal angles between the top-k left (and right) singular subspaces of W₀ and W₁: the largest
  angle in degrees and the mean cos² (cosines = singular values of U₀ₖᵀU₁ₖ; 1 = same subspace);
* spectral drift σᵢ(W₁)/σᵢ(W₀), i ≤ max k;
* rank-1 dominance σ₁(ΔW)²/‖ΔW‖²;
* intruders: W₁'s top-k left singular vectors whose |cosine| with every one of W₀'s top 2k is ≤ 0.5;
* enrichment of the update mask M (first τ, the analysis's mode: the counts' rule) in the top p % of
  |W₀| and of |W₀'s rank-PRINCIPAL_K reconstruction|: observed |M ∧ P|, expected |M|·|P|/N, ratio.

torch is imported on first use (the fused CPU path and the backend import this module without it).
All in float64 torch on the analysis's device. Singular triplets come from the eigendecomposition of
the short side's Gram matrix when min(m, n) ≤ EXACT_MAX (vectors accurate to ε·σ₁²/gap, the route the
rank takes), else from a seeded randomized subspace iteration on the short side (OVERSAMPLE extra
columns; POWER_ITERS steps from a random start for W₀, WARM_ITERS from W₀'s top vectors for W₁, which
an update moves little), whose top-q subspaces agree with the exact ones to ~1e-10 when the spectrum
has a gap after q (tests/test_geometry.py checks it against NumPy's SVD). The iteration costs
2·steps + 1 products with the matrix, about as many flops as the rank's Gram (bench/rank.py).
A subspace is only defined up to ties: when σ_k(W₀) = σ_{k+1}(W₀) any basis of the tie is as good.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np

from deltalens.worker.contract import MATRIX_TYPES

if TYPE_CHECKING:
    import torch

KS = (1, 8, 32)
PRINCIPAL_K = 8  # rank of W₀'s reconstruction whose largest entries are the "principal weights"
PERCENTS = (1, 10)  # top-p % selections of the enrichment
MATCH = 0.5  # |cosine| above which a singular vector of W₁ matches one of W₀
EXACT_MAX = 384  # min(m, n) up to which the SVD is exact
OVERSAMPLE, POWER_ITERS, WARM_ITERS = 16, 3, 1
MAX_NUMEL = 1 << 27  # larger matrices get {"skipped": ...}: ~5 float64 copies would not fit comfortably


def float64(m, segments) -> torch.Tensor:
    """A part's 2-D view (NumPy, bf16 as uint16 bits, or torch on any device) as one float64 tensor
    of the rows the counts read (torch converts bf16 in one pass)."""
    import torch

    pieces = [m[s:e] for s, e in segments]
    if isinstance(m, np.ndarray):
        bf16 = m.dtype == np.uint16
        pieces = [torch.from_numpy(p.view(np.int16) if bf16 else p) for p in pieces]
        pieces = [p.view(torch.bfloat16) if bf16 else p for p in pieces]
    wide = [p.to(torch.float64) for p in pieces]
    return torch.cat(wide) if len(wide) > 1 else wide[0]


def _orth(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of a's columns, each column's direction kept (Q of QR, signs of R's diagonal)."""
    import torch

    q, r = torch.linalg.qr(a)
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


def _gram_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, σ descending, V) of a from eigh of its short side's Gram: BLAS-3 and a small
    eigenproblem instead of a bidiagonalisation; the long side is a's image of the short one."""
    import torch

    tall = a.shape[0] >= a.shape[1]
    b = a if tall else a.T  # long × short
    lam, w = (x.flip(-1) for x in torch.linalg.eigh(b.T @ b))
    other = _orth(b @ w)  # = U·σ, re-orthonormalised where σ ≈ 0
    sigma = lam.clamp_min(0).sqrt()
    return (other, sigma, w) if tall else (w, sigma, other)


def top_svd(
    a: torch.Tensor, q: int, start: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """The top-q singular triplets (U m×q, σ, V n×q) of a and how they were found. start: another
    matrix's (U, V) of a's shape near which a's top subspaces lie (W₀'s for W₁): fewer steps."""
    import torch

    r = min(a.shape)
    q = min(q, r)
    if r <= EXACT_MAX:
        u, s, v = _gram_svd(a)
        return u[:, :q], s[:q], v[:, :q], "exact"
    tall = a.shape[0] >= a.shape[1]
    b = a if tall else a.T  # iterate on the short side: QR of short × l only
    given = (start[1] if tall else start[0])[:, : min(r, q + OVERSAMPLE)] if start else b.new_empty((r, 0))
    gen = torch.Generator(device=a.device).manual_seed(0)
    extra = min(r, q + OVERSAMPLE) - given.shape[1]
    omega = torch.randn(r, extra, generator=gen, dtype=a.dtype, device=a.device)
    basis = _orth(torch.cat([given, omega], 1))
    for _ in range(WARM_ITERS if start else POWER_ITERS):
        basis = _orth(b.T @ (b @ basis))
    image, s, w = _gram_svd(b @ basis)  # Rayleigh–Ritz: b ≈ image·diag(s)·(basis·w)ᵀ
    long, short = image[:, :q], (basis @ w)[:, :q]
    return (long, s[:q], short, "randomized") if tall else (short, s[:q], long, "randomized")


def _tops(values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per PERCENTS p: the top p % of flat `values`: K = ⌈N·p/100⌉ entries — every value above the
    K-th largest, then the values equal to it in row-major order (lowest index first) until there are
    K. One np.partition finds every K-th largest at once."""
    import torch

    n = values.numel()
    ks = [-(-n * p // 100) for p in PERCENTS]
    part = np.partition(values.cpu().numpy(), [n - k for k in ks])
    out = []
    for k in ks:
        above = values > float(part[n - k])
        ties = torch.nonzero(values == float(part[n - k])).flatten()[: k - _count(above)]
        out.append((above, ties, k))
    return out


def _enrichment(mask: torch.Tensor, changed: int, values: torch.Tensor) -> list[dict]:
    out = []
    for percent, (above, ties, k) in zip(PERCENTS, _tops(values)):
        observed = _count(mask & above) + _count(mask[ties])
        expected = changed * k / mask.numel()
        out.append(
            dict(
                percent=percent,
                selected=k,
                observed=observed,
                expected=expected,
                ratio=observed / expected if changed else None,
            )
        )
    return out


def _count(x: torch.Tensor) -> int:
    """True entries of a bool tensor (count_nonzero: no int64 copy as .sum() makes)."""
    import torch

    return int(torch.count_nonzero(x))


def _angles(a: torch.Tensor, b: torch.Tensor, ks: list[int]) -> tuple[list[float], list[float]]:
    """Per k: the largest principal angle (degrees) and the mean cos² between span a[:, :k] and b[:, :k]."""
    import torch

    worst, mean = [], []
    for k in ks:
        cos = torch.linalg.svdvals(a[:, :k].T @ b[:, :k]).clamp(0, 1)
        worst.append(math.degrees(math.acos(cos.min().item())))
        mean.append(cos.square().mean().item())
    return worst, mean


def _share(parts: torch.Tensor, sq: float) -> list[float] | None:
    return (parts / sq).tolist() if sq else None


def geometry(
    w0: torch.Tensor, w1: torch.Tensor, tau: float, relative: bool, sigma1: float | None = None
) -> dict:
    """The figures of one matrix (see the module doc). sigma1: σ₁(ΔW) when already known exactly
    (the rank pass's spectrum), else computed here."""
    import torch

    m, n = w0.shape
    if m * n > MAX_NUMEL:
        return {"skipped": f"larger than {MAX_NUMEL} elements"}
    r = min(m, n)
    ks = sorted({min(k, r) for k in KS})
    top = ks[-1]
    delta = w1 - w0
    sq = float(delta.square().sum())
    u0, s0, v0, method = top_svd(w0, 2 * top)
    u1, s1, v1, _ = top_svd(w1, 2 * top, (u0, v0))  # as many as W₀'s, from W₀'s: they move little
    left = u0[:, :top].T @ delta  # top × n
    right = delta @ v0[:, :top]  # m × top
    both = left @ v0[:, :top]
    at = torch.tensor([k - 1 for k in ks], device=delta.device)
    if sigma1 is None and sq:
        sigma1 = float(top_svd(delta, 1)[1][0])
    left_deg, left_cos2 = _angles(u0, u1, ks)
    right_deg, right_cos2 = _angles(v0, v1, ks)
    cosines = (u1[:, :top].T @ u0).abs()  # W₁'s top vectors × W₀'s top 2·top
    intruders = [torch.nonzero(cosines[:k, : min(2 * k, r)].amax(1) <= MATCH).flatten().tolist() for k in ks]
    a = delta.abs()
    mask = (a > tau * w0.abs()) if relative else (a > tau)
    changed = _count(mask)
    kp = min(PRINCIPAL_K, r)
    principal = ((u0[:, :kp] * s0[:kp]) @ v0[:, :kp].T).abs().flatten()
    return dict(
        k=ks,
        method=method,
        energy_in_topk=_share(torch.stack([both[:k, :k].square().sum() for k in ks]), sq),
        left_in_topk=_share(left.square().sum(1).cumsum(0)[at], sq),
        right_in_topk=_share(right.square().sum(0).cumsum(0)[at], sq),
        angles=dict(
            left_max_deg=left_deg,
            left_mean_cos2=left_cos2,
            right_max_deg=right_deg,
            right_mean_cos2=right_cos2,
        ),
        drift=[b / a if a else None for a, b in zip(s0[:top].tolist(), s1[:top].tolist())],
        rank1_dominance=sigma1**2 / sq if sq else None,
        intruders=dict(count=[len(i) for i in intruders], indices=intruders, threshold=MATCH),
        enrichment=dict(
            tau=tau,
            mode="relative" if relative else "absolute",
            numel=m * n,
            changed=changed,
            magnitude=_enrichment(mask.flatten(), changed, w0.abs().flatten()),
            principal_k=kp,
            principal=_enrichment(mask.flatten(), changed, principal),
        ),
    )


def of_part(mats: list, segments, tau: float, relative: bool, result: dict) -> dict:
    """The hook the pair pass calls per 2-D part: its base and target views, as the kernel read them."""
    if sum(e - s for s, e in segments) * mats[0].shape[1] > MAX_NUMEL:  # before any float64 copy
        return {"skipped": f"larger than {MAX_NUMEL} elements"}
    spectrum = result.get("spectrum")  # (idx, sigma) of ΔW from the exact Gram route, σ₁ first
    sigma1 = spectrum[1][0] if spectrum and spectrum[1] else None
    w0, w1 = (float64(m, segments) for m in mats[:2])
    return geometry(w0, w1, tau, relative, sigma1)


def _at(g: dict, k: int) -> int:
    """Index of the largest k of the matrix's list that is ≤ k (k capped at min(m, n))."""
    return max(i for i, x in enumerate(g["k"]) if x <= k)


def pool(rows: list[tuple[dict, float]]) -> dict:
    """Matrices' geometry pooled into one figure set: (geometry, ‖ΔW‖²) pairs in; energy in the top
    8 and rank-1 dominance as ‖ΔW‖²-weighted means (the share of the group's whole update energy),
    enrichment as Σ observed / Σ expected per selection. What the heatmaps and the summary show."""
    rows = [(g, sq) for g, sq in rows if g and "k" in g]
    weight = sum(sq for g, sq in rows if g["energy_in_topk"] is not None)

    def weighted(value) -> float | None:
        return (
            sum(value(g) * sq for g, sq in rows if g["energy_in_topk"] is not None) / weight
            if weight
            else None
        )

    def ratio(selector: str, i: int) -> float | None:
        expected = sum(g["enrichment"][selector][i]["expected"] for g, _ in rows)
        return sum(g["enrichment"][selector][i]["observed"] for g, _ in rows) / expected if expected else None

    return dict(
        matrices=len(rows),
        energy_in_top8=weighted(lambda g: g["energy_in_topk"][_at(g, 8)]),
        rank1_dominance=weighted(lambda g: g["rank1_dominance"]),
        enrichment={
            selector: [dict(percent=p, ratio=ratio(selector, i)) for i, p in enumerate(PERCENTS)]
            for selector in ("magnitude", "principal")
        },
    )


def summary(tensors: list[dict]) -> dict | None:
    """The pair document's summary.geometry: pooled over the model and per matrix type."""
    rows = [(t, (t.get("norm_delta") or 0.0) ** 2) for t in tensors if (t.get("geometry") or {}).get("k")]
    if not rows:
        return None
    types = sorted(
        {t["matrix"] for t, _ in rows}, key=lambda m: MATRIX_TYPES.index(m) if m in MATRIX_TYPES else 99
    )
    return dict(
        model=pool([(t["geometry"], sq) for t, sq in rows]),
        by_matrix=[
            dict(matrix=m, **pool([(t["geometry"], sq) for t, sq in rows if t["matrix"] == m])) for m in types
        ],
    )


def rows(aid: str, details: list[dict]) -> dict[str, list[tuple]]:
    """The `geometry` and `enrichment` table rows of a pair's details (contract.SCHEMA_SQL)."""
    out: dict[str, list[tuple]] = {"geometry": [], "enrichment": []}
    for d in details:
        g, run, name = d["row"].get("geometry"), d["run"], d["name"]
        if not g or "k" not in g:
            continue
        a = g["angles"]
        out["geometry"].append(
            (aid, run, name, g["k"], g["energy_in_topk"], g["left_in_topk"], g["right_in_topk"])
            + (a["left_max_deg"], a["right_max_deg"], g["drift"], g["rank1_dominance"])
            + (g["intruders"]["count"], d["sq_delta"], g["method"], json.dumps(g))
        )
        e = g["enrichment"]
        out["enrichment"] += [
            (aid, run, name, selector, s["percent"], e["tau"], e["numel"], e["changed"])
            + (s["selected"], s["observed"], s["expected"], s["ratio"])
            for selector in ("magnitude", "principal")
            for s in e[selector]
        ]
    return out
