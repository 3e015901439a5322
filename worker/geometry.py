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

Float64 throughout the figures: in NumPy on the CPU (the rank's BLAS and thread pool; torch's float64
GEMM ran 1.7× slower on the development box), in torch on a CUDA device (imported on first use).
Singular triplets come from the eigendecomposition of the short side's Gram matrix when
min(m, n) ≤ EXACT_MAX (vectors accurate to ε·σ₁²/gap, the route the rank takes), else from a seeded
randomized subspace iteration on the short side (OVERSAMPLE extra columns; POWER_ITERS steps from a
random start for W₀, the first POWER_ITERS32 of them in float32, which only has to find the
subspace the float64 step then sharpens; WARM_ITERS from W₀'s top vectors for W₁, which an update
moves little), closed by a float64 Rayleigh–Ritz step. Their top-q subspaces agree with the exact
ones to ~1e-10 when the spectrum has a gap after q (tests/test_geometry.py checks it against NumPy's
SVD). W₁'s first step reuses W₀'s: W₁·V₀ = W₀·V₀ + ΔW·V₀, where W₀·V₀ is the Rayleigh–Ritz image
and ΔW·V₀ the projection the energy shares need anyway. A subspace is only defined up to ties:
when σ_k(W₀) = σ_{k+1}(W₀) any basis of the tie is as good.
"""

from __future__ import annotations

import json
import math

import numpy as np

from deltalens.worker.contract import MATRIX_TYPES
from deltalens.worker.metrics import as_float32

KS = (1, 8, 32)
PRINCIPAL_K = 8  # rank of W₀'s reconstruction whose largest entries are the "principal weights"
PERCENTS = (1, 10)  # top-p % selections of the enrichment
MATCH = 0.5  # |cosine| above which a singular vector of W₁ matches one of W₀
EXACT_MAX = 384  # min(m, n) up to which the SVD is exact
OVERSAMPLE, POWER_ITERS, POWER_ITERS32, WARM_ITERS = 16, 3, 2, 1
SAMPLE = 1 << 14  # values sampled to bound the top-p % thresholds
MAX_NUMEL = 1 << 27  # larger matrices get {"skipped": ...}: ~5 float64 copies would not fit comfortably


def _xp(x):
    """x's array module: NumPy, or torch for a (CUDA) tensor."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def float64(m, segments):
    """A part's 2-D view (NumPy, bf16 as uint16 bits, or torch on any device) as one float64 array
    of the rows the counts read: NumPy unless the view is on a CUDA device."""
    pieces = [m[s:e] for s, e in segments]
    if isinstance(m, np.ndarray):
        wide = [as_float32(p).astype(np.float64) for p in pieces]
        return np.concatenate(wide) if len(wide) > 1 else wide[0]
    import torch

    out = torch.cat(pieces).to(torch.float64) if len(pieces) > 1 else pieces[0].to(torch.float64)
    return out if out.is_cuda else out.numpy()


def _orth(a):
    """An orthonormal basis of a's columns, each column's direction kept (Q of QR, signs of R's diagonal)."""
    q, r = _xp(a).linalg.qr(a)
    return q * _xp(a).where(r.diagonal() < 0, -1.0, 1.0)


def _gram_svd(b, q: int):
    """Thin SVD of long × short b from eigh of its Gram: BLAS-3 and a small eigenproblem instead of
    a bidiagonalisation. (top-q long vectors, every σ descending, every short vector, b·short)."""
    xp = _xp(b)
    lam, w = (xp.flip(x, (-1,)) for x in xp.linalg.eigh(b.T @ b))
    image = b @ w  # = long·σ, re-orthonormalised where σ ≈ 0
    return _orth(image[:, :q]), xp.sqrt(xp.clip(lam, 0, None)), w, image


def _cast(a, dtype: str):
    """a in float32 or float64, on its device."""
    if isinstance(a, np.ndarray):
        return a.astype(dtype)
    import torch

    return a.to(getattr(torch, dtype))


def _like(x: np.ndarray, ref):
    """NumPy x as an array of ref's kind, on ref's device."""
    return x if isinstance(ref, np.ndarray) else _xp(ref).asarray(x, device=ref.device)


def _unit(b):
    """b scaled by the power of two (exact) that brings its largest |entry| into [0.5, 1): float32
    products of it neither overflow nor underflow, whatever the weights' scale (a subspace does not
    depend on it)."""
    top = float(abs(b).max()) if b.shape[0] * b.shape[1] else 0.0
    if not top or not math.isfinite(top):
        return b
    exponent = math.frexp(top)[1]
    return b * math.ldexp(1.0, -exponent) if exponent else b


def _top(b, q: int, start=None):
    """The top q singular triplets of long × short b (long vectors, σ, short vectors with the
    oversampled rest, b·short, method). start: (short basis S, b·S) near b's top short subspace;
    S's columns past q are its oversampling."""
    r = b.shape[1]
    if r <= EXACT_MAX:
        return (*_gram_svd(b, q), "exact")
    if start is None:
        omega = np.random.default_rng(0).standard_normal((r, min(r, q + OVERSAMPLE)))
        basis = _orth(_like(omega, b))
        b32 = _cast(_unit(b), "float32") if POWER_ITERS32 else None  # exact for bf16, f16 and f32 weights
        for _ in range(POWER_ITERS32):
            basis = _orth(_cast(b32.T @ (b32 @ _cast(basis, "float32")), "float64"))
        del b32
        steps = POWER_ITERS - POWER_ITERS32
    else:
        basis = _orth(b.T @ start[1])  # b's first step from S (all its columns): bᵀ(b·S)
        steps = WARM_ITERS - 1
    for _ in range(steps):
        basis = _orth(b.T @ (b @ basis))
    long, s, w, image = _gram_svd(b @ basis, q)  # Rayleigh–Ritz: b ≈ long·diag(s)·(basis·w)ᵀ
    return long, s, basis @ w, image, "randomized"


def top_svd(a, q: int, start=None):
    """The top-q singular triplets (U m×q, σ, V n×q) of a and how they were found. start: another
    matrix's (U, V) of a's shape near which a's top subspaces lie (W₀'s for W₁): fewer steps."""
    tall = a.shape[0] >= a.shape[1]
    b = a if tall else a.T  # iterate on the short side: QR of short × l only
    if start is not None:
        basis = start[1] if tall else start[0]
        start = (basis, b @ basis)
    long, s, short, _, method = _top(b, min(q, min(a.shape)), start)
    q = long.shape[1]
    return (long, s[:q], short[:, :q], method) if tall else (short[:, :q], s[:q], long, method)


def _selections(values: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Per PERCENTS p: the flat indices of the top p % of flat `values`, K = ⌈N·p/100⌉ of them —
    every value above the K-th largest, then the values equal to it in row-major order (lowest index
    first) until there are K — and K. Worked out on the candidates only (_candidates)."""
    n = len(values)
    ks = [-(-n * p // 100) for p in PERCENTS]
    at = _candidates(values, max(ks))
    picked = values[at]
    part = np.partition(picked, [len(picked) - k for k in ks])
    out = []
    for k in ks:
        kth = part[len(picked) - k]
        above = picked > kth
        ties = np.flatnonzero(picked == kth)[: k - np.count_nonzero(above)]
        out.append((np.concatenate([at[above], at[ties]]), k))
    return out


def _candidates(values: np.ndarray, most: int) -> np.ndarray:
    """Ascending flat indices of every value at or above a bound that a strided sample puts below
    the `most`-th largest (all indices when the sample misleads): with at least `most` of them, every
    k-th largest (k ≤ most) and all values above it are among them. Needs no NaN."""
    n = len(values)
    sample = values[:: max(1, n // SAMPLE)]
    rank = min(len(sample), int(most / n * len(sample) * 1.25) + 32)  # the bound sits well below
    at = np.flatnonzero(values >= np.partition(sample, len(sample) - rank)[len(sample) - rank])
    return at if len(at) >= most else np.arange(n)


def _enrichment(mask: np.ndarray, changed: int, values) -> list[dict]:
    out = []
    for percent, (selected, k) in zip(PERCENTS, _selections(_host(values))):
        observed = int(np.count_nonzero(mask[selected]))
        expected = changed * k / len(mask)
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


def _count(x) -> int:
    """True entries of a bool array (count_nonzero: no int64 copy as .sum() makes)."""
    return int(_xp(x).count_nonzero(x))


def _angles(a, b, ks: list[int]) -> tuple[list[float], list[float]]:
    """Per k: the largest principal angle (degrees) and the mean cos² between span a[:, :k] and b[:, :k]."""
    worst, mean = [], []
    for k in ks:
        cos = np.linalg.svd(_host(a[:, :k].T @ b[:, :k]), compute_uv=False).clip(0, 1)
        worst.append(math.degrees(math.acos(cos.min())))
        mean.append(float(np.square(cos).mean()))
    return worst, mean


def _share(parts, sq: float) -> list[float] | None:
    return (_host(parts) / sq).tolist() if sq else None


def geometry(w0, w1, tau: float, relative: bool, sigma1: float | None = None) -> dict:
    """The figures of one matrix (see the module doc), from float64 W₀ and W₁ (NumPy or torch).
    sigma1: σ₁(ΔW) when already known exactly (the rank pass's spectrum), else computed here."""
    m, n = w0.shape
    if m * n > MAX_NUMEL:
        return {"skipped": f"larger than {MAX_NUMEL} elements"}
    r = min(m, n)
    ks = sorted({min(k, r) for k in KS})
    top, at = ks[-1], [k - 1 for k in ks]
    tall = m >= n  # work on long × short views b: the short side's Gram and bases
    delta = w1 - w0
    flat = delta.ravel()
    sq = float(flat @ flat)
    b0, b1, d = (x if tall else x.T for x in (w0, w1, delta))
    long0, s0, short0, image0, method = _top(b0, 2 * top)
    cols = min(r, 2 * top + OVERSAMPLE)
    onto_short = d @ short0[:, :cols]  # ΔW on W₀'s short-side vectors: energies and W₁'s first step
    long1, s1, short1, _, _ = _top(b1, top, (short0[:, :cols], image0[:, :cols] + onto_short))
    onto_long = long0[:, :top].T @ d  # top × short
    both = onto_long @ short0[:, :top]
    short_sq = (onto_short[:, :top] ** 2).sum(0).cumsum(0)[at]
    long_sq = (onto_long**2).sum(1).cumsum(0)[at]
    pairs = ((long0, short0), (long1, short1))
    (u0, v0), (u1, v1) = ((lng, sht) if tall else (sht, lng) for lng, sht in pairs)  # W's left, right
    if sigma1 is None and sq:
        sigma1 = float(top_svd(delta, 1)[1][0])
    left_deg, left_cos2 = _angles(u0, u1, ks)
    right_deg, right_cos2 = _angles(v0, v1, ks)
    cosines = abs(_host(u1[:, :top].T @ u0[:, : min(2 * top, r)]))  # W₁'s top vectors × W₀'s top 2·top
    intruders = [np.flatnonzero(cosines[:k, : min(2 * k, r)].max(1) <= MATCH).tolist() for k in ks]
    xp = _xp(delta)
    spent = xp.abs(delta, out=delta)  # ΔW's buffer from here on: |ΔW|, then |W₀|, then principal weights
    size = abs(w0) if relative else None
    mask = _host((spent > tau * size if relative else spent > tau).ravel())
    changed = _count(mask)
    magnitude = _enrichment(mask, changed, (xp.abs(w0, out=spent) if size is None else size).ravel())
    kp = min(PRINCIPAL_K, r)
    principal = xp.abs(xp.matmul(u0[:, :kp] * s0[:kp], v0[:, :kp].T, out=spent), out=spent).ravel()
    s0, s1 = _host(s0[:top]).tolist(), _host(s1[:top]).tolist()
    return dict(
        k=ks,
        method=method,
        energy_in_topk=_share(np.array([float((both[:k, :k] ** 2).sum()) for k in ks]), sq),
        left_in_topk=_share(long_sq if tall else short_sq, sq),
        right_in_topk=_share(short_sq if tall else long_sq, sq),
        angles=dict(
            left_max_deg=left_deg,
            left_mean_cos2=left_cos2,
            right_max_deg=right_deg,
            right_mean_cos2=right_cos2,
        ),
        drift=[b / a if a else None for a, b in zip(s0, s1)],
        rank1_dominance=sigma1**2 / sq if sq else None,
        intruders=dict(count=[len(i) for i in intruders], indices=intruders, threshold=MATCH),
        enrichment=dict(
            tau=tau,
            mode="relative" if relative else "absolute",
            numel=m * n,
            changed=changed,
            magnitude=magnitude,
            principal_k=kp,
            principal=_enrichment(mask, changed, principal),
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
