"""The one-pass C kernel (worker/_fastpair.c) against an independent float64 NumPy reference.

Straight into FusedPairAccumulator, no checkpoint files: every figure of the pass — counts at
several τ in both modes, both fine histograms, the ULP histogram, the update map, max |Δ|, the
moments — for every element kind, on matrices built to reach each of the kernel's paths: rows
whose share of moved values goes from none to all (its sparse and dense ways of counting), widths
that are not a multiple of its 16-lane blocks, a column vector, several map rows inside one call,
partitions on two threads, and the values where an off-by-one shows: zeros, +0 against -0,
subnormals, powers of two (|Δ|/|b| exactly on a bin edge), bin edges themselves, huge changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

from deltalens.worker import fused
from deltalens.worker.contract import BIN_EDGES, ULP_BINS, ULP_EDGES, ULP_FORMATS

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="C kernel not built")

TAUS = [1e-5, 0.0, float(BIN_EDGES[100]), 3e-3]
# stored kind -> (NumPy dtype of the values, dtype the kernel is fed, ULP format)
KINDS = {
    "BF16": (np.float32, np.uint16, ULP_FORMATS["BF16"]),
    "F16": (np.float16, np.float16, ULP_FORMATS["F16"]),
    "F32": (np.float32, np.float32, ULP_FORMATS["F32"]),
    "F64": (np.float64, np.float64, ULP_FORMATS["F64"]),
}


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round half to even), as the checkpoint readers hand them over."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def values(bits: np.ndarray, kind: str) -> np.ndarray:
    """float64 values of what the kernel reads."""
    if kind == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.astype(np.float64)


def pair(kind: str, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A base and a target in the kernel's input dtype: row r moves a share r / rows of its values by
    1..~64 ULPs or by much more, with the awkward values planted across the matrix."""
    rng = np.random.default_rng(seed)
    dtype, stored, _ = KINDS[kind]
    b = rng.standard_normal((rows, cols)) * 0.02
    share = (np.arange(rows) / max(rows - 1, 1))[:, None]
    moved = rng.random((rows, cols)) < share
    size = np.where(rng.random((rows, cols)) < 0.9, np.exp2(rng.uniform(-9, -2, (rows, cols))), 10.0)
    t = np.where(moved, b * (1 + size * rng.choice([-1, 1], (rows, cols))), b)
    flat_b, flat_t = b.reshape(-1), t.reshape(-1)
    n = flat_b.size
    spots = rng.permutation(n)[: min(n, 60)]
    tiny = {"BF16": 1e-39, "F16": 1e-6, "F32": 1e-40, "F64": 1e-310}[kind]
    plants = [  # (base, target)
        (0.0, 0.0),
        (0.0, -0.0),
        (-0.0, 0.0),
        (0.0, 1e-3),
        (0.5, 0.5 + 2**-8),  # a power of two: |Δ|/|b| on the bfloat16 grid
        (1.0, 1.0 - 2**-9),  # across a power of two downwards
        (tiny, 2 * tiny),
        (-tiny, tiny),
        (BIN_EDGES[40], 0.0),  # |Δ| exactly on a bin edge
        (1.0, 1.0 + BIN_EDGES[200]),
        (3e-3, -4e2 if kind != "F16" else -4e1),  # far more than 2^16 ULPs
        (2.0**-5, 2.0**-5 * (1 + 2**-7)),
    ]
    for i, spot in enumerate(spots):
        flat_b[spot], flat_t[spot] = plants[i % len(plants)]
    b, t = b.astype(dtype), t.astype(dtype)
    if kind == "BF16":
        return bf16(b), bf16(t)
    return b.astype(stored), t.astype(stored)


def spacing(b: np.ndarray, kind: str) -> np.ndarray:
    """ulp of the stored dtype at each base value, by NumPy (bf16: float32 spacing · 2^16)."""
    if kind == "BF16":
        return np.spacing(np.abs(b.astype(np.float32))).astype(np.float64) * 2.0**16
    return np.spacing(np.abs(b.astype(KINDS[kind][0]))).astype(np.float64)


def expected(b64: np.ndarray, t64: np.ndarray, kind: str, relative: bool) -> dict:
    d = np.abs(t64 - b64)
    with np.errstate(over="ignore"):  # F64 base at a subnormal, a big change: u = inf, the top bin
        u = d / spacing(b64, kind)
    ulp = np.bincount(
        np.where(u == 0, 0, np.searchsorted(np.asarray(ULP_EDGES), u, side="left") + 1).ravel(),
        minlength=ULP_BINS,
    )
    over = d > TAUS[0] * np.abs(b64) if relative else d > TAUS[0]
    return dict(
        changed_abs=[ref.changed(b64, t64, tau) for tau in TAUS],
        changed_rel=[ref.changed(b64, t64, tau, relative=True) for tau in TAUS],
        hist_abs=ref.histogram(d),
        hist_rel=ref.histogram(ref.relative_values(b64, t64)),
        ulp_hist=ulp.tolist(),
        max_abs_delta=float(d.max()),
        mask=over,
    )


def run(b: np.ndarray, t: np.ndarray, kind: str, relative: bool, matrix: bool, chunk_rows: int):
    rows, cols = b.shape
    acc = fused.FusedPairAccumulator(
        rows, cols, TAUS, relative, matrix, False, None, True, ulp=ULP_FORMATS[kind]
    )
    for r0 in range(0, rows, chunk_rows):
        acc.add(b[r0 : r0 + chunk_rows], [t[r0 : r0 + chunk_rows]], r0)
    return acc, acc.result()


CASES = [  # kind, rows, cols, 2-D (update map), rows per add() call
    ("BF16", 70, 45, True, 13),
    ("BF16", 300, 256, True, 300),  # 76,800 elements: two partitions on two threads
    ("BF16", 333, 1, False, 333),  # a column vector: one flat run
    ("F16", 40, 37, True, 7),
    ("F32", 64, 48, True, 64),
    ("F64", 30, 17, True, 11),
]


@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("kind,rows,cols,matrix,chunk", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES])
def test_every_figure_matches_float64(kind, rows, cols, matrix, chunk, relative):
    b, t = pair(kind, rows, cols, seed=rows * cols)
    b64, t64 = values(b, kind), values(t, kind)
    (acc, got), want = run(b, t, kind, relative, matrix, chunk), expected(b64, t64, kind, relative)
    for key in ("changed_abs", "changed_rel", "hist_abs", "hist_rel", "ulp_hist", "max_abs_delta"):
        assert got[key] == want[key], key
    assert 0 < want["changed_abs"][1] < b.size  # some values moved, some did not
    d = t64 - b64
    assert got["sq_delta"] == pytest.approx(float((d * d).sum()), rel=1e-12)
    assert got["sq_base"] == pytest.approx(float((b64 * b64).sum()), rel=1e-12)
    assert got["sum_abs_delta"] == pytest.approx(float(np.abs(d).sum()), rel=1e-12)
    if matrix:  # the map at τ[0] in the pass's mode: exact row and column sums, cells as shares
        e = ref.update_map(want["mask"])
        assert acc.map.row_counts.tolist() == e["rows"].tolist()
        assert acc.map.col_counts.sum(0).tolist() == e["cols"].tolist()
        np.testing.assert_allclose(got["update_map"]["cells"], e["cells"], rtol=1e-12)
