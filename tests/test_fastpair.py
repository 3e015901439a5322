"""The one-pass C kernel (worker/_fastpair.c) against the torch kernel and a float64 NumPy reference.

Straight into FusedPairAccumulator, no checkpoint files: every figure of the pass — counts at
several τ in both modes, both fine histograms, the ULP histogram, the update map, max |Δ|, the
moments — for every element kind, on matrices built to reach each of the kernel's paths: rows
whose share of moved values goes from none to all (its sparse and dense ways of counting), widths
that are not a multiple of its 16-lane blocks, a column vector, several map rows inside one call,
partitions on two threads, rows wider than its stack scratch for the map, and the values where an
off-by-one shows: zeros, +0 against -0, subnormals, powers of two (|Δ|/|b| exactly on a bin edge),
bin edges themselves, huge changes. Then randomized matrices at 0/10/50/100 % moved with NaN, ±Inf,
-0 and subnormals sprinkled in (in the base, the target or both, the same bits or not): counts and
histograms still equal the reference's to the last weight, and max |Δ| and the moments turn NaN or
Inf exactly where the reference's do (the caller refuses such tensors from those moments).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

from deltalens.worker import fused
from deltalens.worker.contract import BIN_EDGES, ULP_BINS, ULP_EDGES, ULP_FORMATS
from deltalens.worker.kernels import PairAccumulator
from deltalens.worker.metrics import MAP_CELLS, bin_bounds

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="C kernel not built")

TAUS = [1e-5, 0.0, float(BIN_EDGES[100]), 3e-3]
# stored kind -> (NumPy dtype of the values, dtype the kernel is fed, ULP format)
KINDS = {
    "BF16": (np.float32, np.uint16, ULP_FORMATS["BF16"]),
    "F16": (np.float16, np.float16, ULP_FORMATS["F16"]),
    "F32": (np.float32, np.float32, ULP_FORMATS["F32"]),
    "F64": (np.float64, np.float64, ULP_FORMATS["F64"]),
    "F8": (np.float64, np.float64, None),  # fp8 is dequantized to float64, no ULP histogram
}
TINY = {"BF16": 1e-39, "F16": 1e-6, "F32": 1e-40, "F64": 1e-310, "F8": 1e-310}  # subnormals
FIGURES = ("changed_abs", "changed_rel", "hist_abs", "hist_rel", "ulp_hist")
SUMS = ("sq_delta", "sq_base", "sum_abs_delta", "max_abs_delta")


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round half to even), as the checkpoint readers hand them over."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def values(bits: np.ndarray, kind: str) -> np.ndarray:
    """float64 values of what the kernel reads."""
    if kind == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.astype(np.float64)


def stored(b: np.ndarray, t: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 base and target rounded to the kind, as the kernel's input dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        b, t = b.astype(KINDS[kind][0]), t.astype(KINDS[kind][0])
    if kind == "BF16":
        return bf16(b), bf16(t)
    if kind == "F8":  # on a coarse grid: 3 mantissa bits, a power-of-two scale
        with np.errstate(invalid="ignore"):
            m, e = np.frexp(b)
            b = np.where(np.isfinite(b), np.ldexp(np.round(m * 16) / 16, e), b)
            m, e = np.frexp(t)
            t = np.where(np.isfinite(t), np.ldexp(np.round(m * 16) / 16, e), t)
    return b.astype(KINDS[kind][1]), t.astype(KINDS[kind][1])


def pair(kind: str, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A base and a target in the kernel's input dtype: row r moves a share r / rows of its values by
    1..~64 ULPs or by much more, with the awkward values planted across the matrix."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((rows, cols)) * 0.02
    share = (np.arange(rows) / max(rows - 1, 1))[:, None]
    moved = rng.random((rows, cols)) < share
    size = np.where(rng.random((rows, cols)) < 0.9, np.exp2(rng.uniform(-9, -2, (rows, cols))), 10.0)
    t = np.where(moved, b * (1 + size * rng.choice([-1, 1], (rows, cols))), b)
    flat_b, flat_t = b.reshape(-1), t.reshape(-1)
    n = flat_b.size
    spots = rng.permutation(n)[: min(n, 60)]
    tiny = TINY[kind]
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
    return stored(b, t, kind)


def hostile(kind: str, rows: int, cols: int, moved: float, specials: float, seed: int):
    """A share `moved` of the values moved by 1..~64 ULPs or far more; a share `specials` of the
    positions holding NaN (either sign), ±Inf, ±0 or a subnormal in the base, the target or both."""
    rng = np.random.default_rng(seed)
    shape = (rows, cols)
    b = rng.standard_normal(shape) * 0.02
    size = np.where(rng.random(shape) < 0.9, np.exp2(rng.uniform(-9, -2, shape)), 10.0)
    t = np.where(rng.random(shape) < moved, b * (1 + size * rng.choice([-1, 1], shape)), b)
    tiny = TINY[kind]
    pool = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 3 * tiny, 1.0])
    spots = rng.random(shape) < specials
    where = rng.integers(0, 4, shape)  # base only, target only, both the same, both drawn apart
    first, second = rng.choice(pool, shape), rng.choice(pool, shape)
    b = np.where(spots & (where != 1), first, b)
    t = np.where(spots & (where == 1), first, np.where(spots & (where == 2), first, t))
    t = np.where(spots & (where == 3), second, t)
    return stored(b, t, kind)


def spacing(b: np.ndarray, kind: str) -> np.ndarray:
    """ulp of the stored dtype at each base value, by NumPy (bf16: float32 spacing · 2^16)."""
    with np.errstate(invalid="ignore"):
        if kind == "BF16":
            return np.spacing(np.abs(b.astype(np.float32))).astype(np.float64) * 2.0**16
        return np.spacing(np.abs(b.astype(KINDS[kind][0]))).astype(np.float64)


def expected(b64: np.ndarray, t64: np.ndarray, kind: str, relative: bool) -> dict:
    with np.errstate(over="ignore", invalid="ignore"):  # u = inf past the top bin; NaN from NaN/Inf
        d = np.abs(t64 - b64)
        u = d / spacing(b64, kind)
        over = d > TAUS[0] * np.abs(b64) if relative else d > TAUS[0]
        out = dict(
            changed_abs=[ref.changed(b64, t64, tau) for tau in TAUS],
            changed_rel=[ref.changed(b64, t64, tau, relative=True) for tau in TAUS],
            hist_abs=ref.histogram(d),
            hist_rel=ref.histogram(ref.relative_values(b64, t64)),
            sq_delta=float(((t64 - b64) ** 2).sum()),
            sq_base=float((b64 * b64).sum()),
            sum_abs_delta=float(d.sum()),
            max_abs_delta=float(d.max()) if d.size else 0.0,
            mask=over,
        )
    if KINDS[kind][2]:  # NaN u sorts past every edge: the top bin
        bins = np.searchsorted(np.asarray(ULP_EDGES), u, side="left") + 1
        out["ulp_hist"] = np.bincount(np.where(u == 0, 0, bins).ravel(), minlength=ULP_BINS).tolist()
    return out


def run_fused(b: np.ndarray, t: np.ndarray, kind: str, relative: bool, matrix: bool, chunk_rows: int):
    rows, cols = b.shape
    ulp = KINDS[kind][2]
    acc = fused.FusedPairAccumulator(rows, cols, TAUS, relative, matrix, False, None, True, ulp=ulp)
    for r0 in range(0, rows, chunk_rows):
        acc.add(b[r0 : r0 + chunk_rows], [t[r0 : r0 + chunk_rows]], r0)
    return acc, acc.result()


def run_torch(b: np.ndarray, t: np.ndarray, kind: str, relative: bool, matrix: bool):
    """The torch kernel, one chunk per update-map row (as the engine feeds it)."""
    rows, cols = b.shape
    bits = lambda x: torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)  # noqa: E731
    as_torch = bits if kind == "BF16" else torch.from_numpy
    acc = PairAccumulator(
        rows, cols, TAUS, relative, matrix, False, None, True, torch.device("cpu"), ulp=KINDS[kind][2]
    )
    edges = bin_bounds(rows, min(MAP_CELLS, rows)) if matrix else [0, rows]
    for grid_row, (r0, r1) in enumerate(zip(edges, edges[1:])):
        acc.add(as_torch(b[r0:r1]), [as_torch(t[r0:r1])], r0, grid_row)
    return acc, acc.result()


def assert_same(got: dict, want: dict) -> None:
    """Counts and histograms exactly; sums to 1e-12 (their order differs), NaN and Inf alike."""
    for key in FIGURES:
        assert got.get(key) == want.get(key), key
    for key in SUMS:
        assert got[key] == pytest.approx(want[key], rel=1e-12, nan_ok=True), key


def assert_same_map(acc, want_acc=None, mask: np.ndarray | None = None) -> None:
    """The map at τ[0] in the pass's mode: exact row and column sums and grid counts."""
    rows, cols, grid = acc.map.row_counts, acc.map.col_counts.sum(0), acc.map.grid.sum(0)
    if mask is not None:
        e = ref.update_map(mask)
        assert rows.tolist() == e["rows"].tolist()
        assert cols.tolist() == e["cols"].tolist()
        np.testing.assert_allclose(acc.result()["update_map"]["cells"], e["cells"], rtol=1e-12)
    if want_acc is not None:
        assert rows.tolist() == want_acc.map.row_counts.tolist()
        assert cols.tolist() == want_acc.map.col_counts.sum(0).tolist()
        assert grid.tolist() == want_acc.map.grid.sum(0).tolist()


CASES = [  # kind, rows, cols, 2-D (update map), rows per add() call
    ("BF16", 70, 45, True, 13),
    ("BF16", 300, 256, True, 300),  # 76,800 elements: two partitions on two threads
    ("BF16", 333, 1, False, 333),  # a column vector: one flat run
    ("BF16", 40, 1500, True, 40),  # wider than the stack scratch: the map's column sums on the heap
    ("F16", 40, 37, True, 7),
    ("F32", 64, 48, True, 64),
    ("F64", 30, 17, True, 11),
    ("F8", 30, 33, True, 30),
]


@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("kind,rows,cols,matrix,chunk", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES])
def test_every_figure_matches_float64_and_torch(kind, rows, cols, matrix, chunk, relative):
    b, t = pair(kind, rows, cols, seed=rows * cols)
    b64, t64 = values(b, kind), values(t, kind)
    (acc, got), want = run_fused(b, t, kind, relative, matrix, chunk), expected(b64, t64, kind, relative)
    assert_same(got, want)
    assert 0 < want["changed_abs"][1] < b.size  # some values moved, some did not
    torch_acc, torch_got = run_torch(b, t, kind, relative, matrix)
    assert_same(got, torch_got)
    if matrix:
        assert_same_map(acc, torch_acc, want["mask"])


HOSTILE = [  # kind, rows, cols: odd widths, a tail of one lane, one element, empty
    ("BF16", 37, 53),
    ("BF16", 5, 1),
    ("F16", 9, 31),
    ("F32", 6, 17),
    ("F64", 7, 15),
    ("F8", 4, 19),
    ("BF16", 1, 1),
    ("F32", 0, 1),
]


@pytest.mark.parametrize("moved", [0.0, 0.1, 0.5, 1.0], ids=lambda m: f"{m:.0%}")
@pytest.mark.parametrize("kind,rows,cols", HOSTILE, ids=[f"{k}-{r}x{c}" for k, r, c in HOSTILE])
def test_nan_inf_zero_subnormal_match_float64_and_torch(kind, rows, cols, moved):
    for seed, specials in enumerate((0.0, 0.02, 0.3, 1.0)):
        b, t = hostile(kind, rows, cols, moved, specials, seed=rows * cols + seed)
        b64, t64 = values(b, kind), values(t, kind)
        for relative in (False, True):
            for matrix in (True, False) if rows * cols else (False,):
                acc, got = run_fused(b, t, kind, relative, matrix, max(rows // 2, 1))
                want = expected(b64, t64, kind, relative)
                assert_same(got, want)
                torch_acc, torch_got = run_torch(b, t, kind, relative, matrix)
                assert_same(got, torch_got)
                if matrix:
                    assert_same_map(acc, torch_acc, want["mask"])


def test_same_nan_and_inf_bits_in_both_count_as_nan_changes():
    """Equal stored bits usually mean Δ = 0, but not for NaN or Inf: Inf − Inf is NaN. The caller
    refuses the tensor from its NaN moments; up to then nothing is skipped and nothing crashes."""
    b = np.array([[np.nan, np.inf, -np.inf, 1.0] + [0.5] * 13], np.float32)
    for kind in ("BF16", "F32"):
        base = bf16(b) if kind == "BF16" else b
        _, got = run_fused(base, base.copy(), kind, False, True, 1)
        assert np.isnan(got["max_abs_delta"]) and np.isnan(got["sq_delta"]) and np.isnan(got["sq_base"])
        assert got["hist_abs"][-1] == got["hist_rel"][-1] == got["ulp_hist"][-1] == 3
        assert got["hist_abs"][0] == 14 and got["changed_abs"] == [0] * len(TAUS)


def test_changes_below_half_an_ulp_of_the_format_are_bin_one():
    """A format coarser than the values (float32 read with bfloat16's ULP): u < 0.5, ceil(u) = 1
    in the torch kernel; the C kernel's table index stays inside its table."""
    b = np.linspace(-2, 2, 48, dtype=np.float32).reshape(3, 16)
    b[0, 0] = 1e-42  # subnormal
    coarse = ULP_FORMATS["BF16"]
    for x in (b, b.astype(np.float64)):
        y = np.nextafter(x, x.dtype.type(np.inf))
        acc = fused.FusedPairAccumulator(3, 16, TAUS, False, True, False, None, True, ulp=coarse)
        acc.add(x, [y], 0)
        torch_acc = PairAccumulator(3, 16, TAUS, False, True, False, None, True, torch.device("cpu"), coarse)
        torch_acc.add(torch.from_numpy(x), [torch.from_numpy(y)], 0, 0)
        assert acc.result()["ulp_hist"] == torch_acc.result()["ulp_hist"]
        assert acc.result()["ulp_hist"][1] == 48
