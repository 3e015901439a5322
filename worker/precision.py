"""Precision-aware change: |Δ| in ULPs of the base's stored dtype, and what fp32 masters would add.

The kernels (worker.fused, worker.kernels) count each matrix's ULP histogram in their one pass
(contract.ULP_EDGES); this module names the dtype's grid for them, turns the counts into the
document's fields, and — for `analyze --masters DIR` — compares the fp32 master weights of the
target with the base in a separate streaming pass (one tensor at a time, torch float64).
"""

from __future__ import annotations

from deltalens.worker.contract import ULP_BINS, ULP_EDGES, ULP_FORMATS, VISIBILITY_FLOOR

UNKNOWABLE = (
    "Stored checkpoints cannot show updates smaller than one step of their dtype: an fp32 master weight "
    "that moved by less than half a bf16 ULP rounds back to the same stored value, so it counts as "
    "unchanged here; only the fp32 masters (--masters) tell those apart."
)
_MASTER_DTYPES = ("F16", "BF16", "F32", "F64")


def ulp_format(dtype: str) -> tuple[int, int] | None:
    """(mantissa bits, min exponent) of a stored dtype's grid, or None: no ULP histogram (integers,
    fp8 read dequantized — their step is the scale's, not the dtype's)."""
    return ULP_FORMATS.get(dtype)


def row_fields(result: dict, dtype: str) -> dict:
    """Per-matrix fields of the document row: the ULP histogram, its one-ULP count, and the
    relative visibility floor of the base's dtype (None where the dtype has no ULP grid)."""
    hist = result.get("ulp_hist")
    return dict(
        ulp_hist=hist,
        one_ulp=hist[1] if hist else None,
        visibility_floor=VISIBILITY_FLOOR.get(dtype),
    )


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _figures(hist: list[int], numel: int) -> dict:
    return dict(
        numel=numel,
        one_ulp=hist[1],
        one_ulp_share=_ratio(hist[1], numel),
        one_ulp_of_changed=_ratio(hist[1], numel - hist[0]),
    )


def summary(tensors: list[dict]) -> dict:
    """Document aggregate from the per-matrix rows (so a fanned-out analysis merges the same): the
    summed ULP histogram, the one-ULP share of all weights and of the changed ones, and the same per
    layer × matrix type."""
    rows = [t for t in tensors if t.get("ulp_hist")]
    total, cells = [0] * ULP_BINS, {}
    for t in rows:
        total = [a + b for a, b in zip(total, t["ulp_hist"])]
        cell = cells.setdefault((t["layer"], t["matrix"]), [[0] * ULP_BINS, 0])
        cell[0] = [a + b for a, b in zip(cell[0], t["ulp_hist"])]
        cell[1] += t["numel"]
    dtypes = sorted({t["dtype"] for t in rows})
    return dict(
        ulp_edges=list(ULP_EDGES),
        ulp_hist=total,
        **_figures(total, sum(t["numel"] for t in rows)),
        dtypes=dtypes,
        visibility_floor={d: VISIBILITY_FLOOR[d] for d in dtypes},
        by_layer_matrix=[
            {"layer": layer, "matrix": matrix, **_figures(hist, numel)}
            for (layer, matrix), (hist, numel) in cells.items()
        ],
        unknowable=UNKNOWABLE,
    )


def store_rows(details: list[dict], aid: str) -> list[tuple]:
    """ulp_histograms rows (contract.SCHEMA_SQL) of a pair's per-matrix details."""
    return [
        (aid, d["run"], d["name"], d["row"]["dtype"], d["ulp_hist"], d["ulp_hist"][1])
        for d in details
        if d.get("ulp_hist")
    ]


# ---------------------------------------------------------------------------------------------
# --masters DIR: true change (fp32 masters vs base) against visible change (stored target vs base)
# ---------------------------------------------------------------------------------------------
def _masks(delta, base, tau: float, relative: bool):
    return delta.abs() > (tau * base.abs() if relative else tau)


def _true_visible_hidden(base, target, master, taus: list[float], relative: bool) -> list[list[int]]:
    """Per τ: |m − b| > τ, |t − b| > τ, and the first without the second (counts)."""
    out = [[], [], []]
    for tau in taus:
        true, visible = _masks(master - base, base, tau, relative), _masks(target - base, base, tau, relative)
        for acc, mask in zip(out, (true, visible, true & ~visible)):
            acc.append(int(mask.sum()))
    return out


def _tau_counts(taus: list[float], counts: list[int]) -> list[dict]:
    return [{"tau": t, "count": c} for t, c in zip(taus, counts)]


def masters_figures(base: str, target: str, masters: str, taus: list[float], relative: bool) -> dict:
    """Per tensor the base shares with the stored target and the masters (same name and shape, a
    float dtype): at each τ, weights whose master moved (true: |m − b| > τ), whose stored value moved
    (visible: |t − b| > τ), and the hidden part (true and not visible); `any` is the same at τ = 0
    (any difference at all). Relative mode compares against τ·|b|. Streams one tensor at a time."""
    import torch

    from deltalens.worker.checkpoint import open_checkpoints

    ckpts = open_checkpoints([base, target, masters])
    names = [
        n
        for n in ckpts[0].names()
        if all(n in c.names() for c in ckpts[1:])
        and len({c.meta(n).shape for c in ckpts}) == 1
        and all(c.meta(n).dtype in _MASTER_DTYPES for c in ckpts)
    ]
    all_taus = [0.0, *taus]
    totals = [[0] * len(all_taus) for _ in range(3)]
    tensors = []
    for n in names:
        b, t, m = (c.tensor(n).to(torch.float64) for c in ckpts)
        counts = _true_visible_hidden(b, t, m, all_taus, relative)
        del b, t, m
        for c in ckpts:
            c.release(n)
        totals = [[a + x for a, x in zip(tot, cnt)] for tot, cnt in zip(totals, counts)]
        tensors.append(_masters_entry(n, counts, taus))
    out = _masters_entry(str(masters), totals, taus)
    out["path"] = out.pop("name")
    unmatched = len(set(ckpts[0].names()) & set(ckpts[1].names())) - len(names)
    return {**out, "tensors": tensors, "compared": len(names), "unmatched": unmatched}


def _masters_entry(name: str, counts: list[list[int]], taus: list[float]) -> dict:
    true, visible, hidden = counts
    return {
        "name": name,
        "any": {"true": true[0], "visible": visible[0], "hidden": hidden[0]},
        "true": _tau_counts(taus, true[1:]),
        "visible": _tau_counts(taus, visible[1:]),
        "hidden": _tau_counts(taus, hidden[1:]),
    }
