"""Statistics of update masks of several runs / checkpoints against one base (issue 13, items 4–5).

Overlap: a pair's observed |A ∧ B| against the density-matched random baseline. Within one tensor
of N weights, a random mask of |B| weights meets A in a hypergeometric number of weights: mean
|A||B|/N, variance |A||B|(N−|A|)(N−|B|) / (N²(N−1)). A model's baseline is the sum of its tensors'
means (masks are denser in some tensors than others; |A||B|/N of the totals ignores that and is
reported next to it as `baseline_global`), and its z-score the stratified one: (observed − Σ mean) /
sqrt(Σ variance). `upset` lists every intersection of runs: `exact` counts the weights changed in
exactly those runs (UpSet's distinct mode; the Venn regions), `inclusive` those changed in at least
those runs. Sign agreement: among weights changed in both runs, those whose Δ has the same sign.

Series: the first checkpoint at which each weight differs from the base (at τ), counted per step
and split into kept (still changed at the final checkpoint) and reverted; ‖θ_t − θ₀‖ per step; the
transient share per layer × matrix type (Σ transient / Σ weights of the cell's tensors).

Pure Python over the kernels' exact integer counts: no per-weight work here.
"""

from __future__ import annotations

import math

from deltalens.worker.contract import MATRIX_TYPES

GROUP_KEYS = ("matrix", "layer")  # overlap aggregated per matrix type and per layer


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def hypergeometric(a: int, b: int, n: int) -> tuple[float, float]:
    """Mean and variance of |A ∧ R| for a uniformly random R of |B| = b weights among n, |A| = a."""
    if n < 2:
        return (a * b / n if n else 0.0), 0.0
    return a * b / n, a * b * (n - a) * (n - b) / (n * n * (n - 1))


def _z(observed: int, mean: float, variance: float) -> float | None:
    return (observed - mean) / math.sqrt(variance) if variance > 0 else None


def judged(p: dict, mean: float, variance: float, same: int) -> dict:
    """A pair's figures against its baseline, and its sign agreement (exact counts)."""
    return p | {
        "baseline": mean,
        "variance": variance,
        "lift": _ratio(p["both"], mean),
        "z": _z(p["both"], mean, variance),
        "same_sign": same,
        "opposite_sign": p["both"] - same,
        "sign_agreement": _ratio(same, p["both"]),
    }


def tensor_pairs(pairs: list[dict], changed: list[int], numel: int, same_sign: list[list[int]]) -> list[dict]:
    """One tensor's pairs with their hypergeometric baseline, lift, z and sign agreement."""
    return [
        judged(p, *hypergeometric(changed[p["a"]], changed[p["b"]], numel), same_sign[p["a"]][p["b"]])
        for p in pairs
    ]


def summed_pairs(tensors: list[dict], changed: list[int], numel: int) -> list[dict]:
    """Pairs of a set of tensors: observed, Σ per-tensor baselines and variances, same-sign counts;
    with the baseline of the totals (|A||B|/N) next to them."""
    out = []
    for i, p in enumerate(tensors[0]["pairs"] if tensors else []):
        rows = [t["pairs"][i] for t in tensors]
        both = sum(r["both"] for r in rows)
        row = judged(
            {"a": p["a"], "b": p["b"], "both": both},
            sum(r["baseline"] for r in rows),
            sum(r["variance"] for r in rows),
            sum(r["same_sign"] for r in rows),
        )
        mean, variance = hypergeometric(changed[p["a"]], changed[p["b"]], numel)
        out.append(
            row
            | {
                "baseline_global": mean,
                "lift_global": _ratio(both, mean),
                "z_global": _z(both, mean, variance),
            }
        )
    return out


def order(key: str):
    """Sort key of a group value: matrix types in contract order, layers by index (None last)."""
    if key == "matrix":
        return lambda v: MATRIX_TYPES.index(v) if v in MATRIX_TYPES else len(MATRIX_TYPES)
    return lambda v: (v is None, v or 0)


def grouped(tensors: list[dict], key: str, runs: int) -> list[dict]:
    """Per matrix type or per layer: weights, changed per run, and every pair's summed figures."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t[key], []).append(t)
    out = []
    for value in sorted(groups, key=order(key)):
        members = groups[value]
        changed = [sum(t["changed"][k] for t in members) for k in range(runs)]
        numel = sum(t["numel"] for t in members)
        out.append(
            {key: value, "numel": numel, "changed": changed, "pairs": summed_pairs(members, changed, numel)}
        )
    return out


def upset(patterns: list[int], runs: int) -> list[dict]:
    """Every non-empty set of runs (by membership code, run 0 the lowest bit): weights changed in
    exactly those runs and in at least those runs (superset sums of the exact counts)."""
    inclusive = list(patterns)
    for k in range(runs):  # sum over supersets, one bit at a time: O(runs · 2^runs)
        bit = 1 << k
        for code in range(len(inclusive)):
            if not code & bit:
                inclusive[code] += inclusive[code | bit]
    return [
        {
            "region": "".join("1" if code >> k & 1 else "0" for k in range(runs)),
            "runs": [k for k in range(runs) if code >> k & 1],
            "exact": patterns[code],
            "inclusive": inclusive[code],
        }
        for code in range(1, len(patterns))
    ]


# ---------------------------------------------------------------------------------------------
# series
# ---------------------------------------------------------------------------------------------
def step_figures(first: list[list[int]], sq_delta: list[float]) -> list[dict]:
    """Per checkpoint: weights first changed there (kept / reverted by the final one), ‖θ_t − θ₀‖."""
    reverted, kept = first
    return [
        {"first_changed": r + k, "kept": k, "reverted": r, "norm_delta": math.sqrt(d)}
        for r, k, d in zip(reverted, kept, sq_delta)
    ]


def transient_heatmap(tensors: list[dict]) -> dict:
    """Layer × matrix-type grid of transient weights, weights, and their ratio (parameter-weighted)."""
    cells: dict = {}
    for t in tensors:
        c = cells.setdefault((t["layer"], t["matrix"]), [0, 0])
        c[0] += t["categories"]["transient"]
        c[1] += t["numel"]
    layers = sorted({k[0] for k in cells}, key=order("layer"))
    matrices = sorted({k[1] for k in cells}, key=order("matrix"))

    def grid(f):
        return [[f(cells[(la, m)]) if (la, m) in cells else None for m in matrices] for la in layers]

    return {
        "layers": layers,
        "matrices": matrices,
        "transient": grid(lambda c: c[0]),
        "numel": grid(lambda c: c[1]),
        "share": grid(lambda c: _ratio(c[0], c[1])),
    }
