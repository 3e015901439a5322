"""One-pass CPU kernel for `pair` (numba + NumPy; no torch import on this path).

The torch kernel (worker.kernels) makes ~15 passes over each chunk; this one reads each element
once, keeps every intermediate in registers and skips all work for weights that did not move.
Same float64 arithmetic and the same bins, so its counts equal the torch kernel's (the tests run
both against the NumPy reference). bfloat16 arrives as raw uint16 and is widened in the kernel.
"""
from __future__ import annotations

import numpy as np

from worker.contract import FINE_CELLS
from worker.metrics import Spectrum, UpdateMap, pair_result

try:
    import numba
    from numba import njit, prange
    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a declared dependency; torch still works without it
    AVAILABLE = False

# dtypes (safetensors spelling) the kernel reads directly, and how NumPy holds them
DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
_F64_TO_CELL = ((1023 - 127) << 7) - 1

if AVAILABLE:
    @njit(inline="always")
    def _cell(bits):
        """bfloat16-grid cell (lo, hi] of a positive float64 given by its bits (see kernels.fine_cells)."""
        c = ((bits - 1) >> 45) - _F64_TO_CELL
        return 1 if c < 1 else (FINE_CELLS if c > FINE_CELLS else c)

    @njit(inline="always")
    def _widen_row(src, r, out, scratch32, scratch_f32, bf16):
        if bf16:
            for j in range(out.shape[0]):
                scratch32[j] = np.uint32(src[r, j]) << 16
            for j in range(out.shape[0]):
                out[j] = scratch_f32[j]
        else:
            for j in range(out.shape[0]):
                out[j] = src[r, j]

    @njit(parallel=True, cache=True, nogil=True, error_model="numpy")  # x/0 -> inf, as IEEE says
    def pair_chunk(b, t, bf16, taus, relative, want_map, row_bin, col_bin,
                   hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid):
        """One row chunk. b, t: (rows, cols) float32/float64, or uint16 holding bfloat16 when bf16.
        Per-partition accumulators (axis 0 = partition): hist_* (P, cells), changed (P, 2, T)
        [abs, rel], moments (P, 3) [ΣΔ², Σb², Σ|Δ|], max_abs (P,), col_counts (P, cols),
        grid (P, grid_rows, grid_cols). row_counts (rows,) and row_bin (rows,) cover this chunk."""
        rows, cols = b.shape
        parts = hist_abs.shape[0]
        n_taus = taus.shape[0]
        for p in prange(parts):
            r0, r1 = p * rows // parts, (p + 1) * rows // parts
            bv, tv = np.empty(cols), np.empty(cols)
            bv_bits, tv_bits = bv.view(np.int64), tv.view(np.int64)
            scratch = np.empty(cols, np.uint32)
            scratch_f32 = scratch.view(np.float32)
            h_abs, h_rel, cnt = hist_abs[p], hist_rel[p], changed[p]
            sq_d, sq_b, sum_a, top, zeros = 0.0, 0.0, 0.0, max_abs[p], 0
            for r in range(r0, r1):
                _widen_row(b, r, bv, scratch, scratch_f32, bf16)
                _widen_row(t, r, tv, scratch, scratch_f32, bf16)
                in_row = 0
                g = grid[p, row_bin[r]] if want_map else grid[p, 0]
                for j in range(cols):
                    base = bv[j]
                    sq_b += base * base
                    d = tv[j] - base
                    if d == 0.0:
                        zeros += 1
                        continue
                    a = abs(d)
                    ab = abs(base)
                    sq_d += d * d
                    sum_a += a
                    if a > top:
                        top = a
                    for k in range(n_taus):
                        if a > taus[k]:
                            cnt[0, k] += 1
                        if a > taus[k] * ab:
                            cnt[1, k] += 1
                    if want_map and (a > taus[0] * ab if relative else a > taus[0]):
                        in_row += 1
                        col_counts[p, j] += 1
                        g[col_bin[j]] += 1
                    tv[j] = a               # reuse the row buffers to read the bits of |Δ| and |Δ|/|b|
                    bv[j] = a / ab
                    h_abs[_cell(tv_bits[j])] += 1
                    h_rel[_cell(bv_bits[j])] += 1
                if want_map:
                    row_counts[r] = in_row
            h_abs[0] += zeros
            h_rel[0] += zeros
            moments[p, 0] += sq_d
            moments[p, 1] += sq_b
            moments[p, 2] += sum_a
            max_abs[p] = top


def threads() -> int:
    return numba.get_num_threads() if AVAILABLE else 1


class FusedPairAccumulator:
    """`pair` figures for one matrix from NumPy row chunks (same record as kernels.PairAccumulator)."""

    def __init__(self, rows: int, cols: int, taus: list[float], relative: bool, matrix_2d: bool, want_rank: bool,
                 heads: int | None, heads_on_rows: bool):
        parts = threads()
        self.rows, self.cols, self.relative = rows, cols, relative
        self.taus = np.asarray(taus, dtype=np.float64)
        self.hist = np.zeros((2, parts, FINE_CELLS + 1), dtype=np.int64)
        self.changed = np.zeros((parts, 2, len(taus)), dtype=np.int64)
        self.moments = np.zeros((parts, 3))
        self.max_abs = np.zeros(parts)
        self.map = UpdateMap(rows, cols, heads, heads_on_rows, parts) if matrix_2d else None
        self.spectrum = Spectrum(rows, cols, np) if matrix_2d and want_rank else None
        # without a map the kernel gets 1-element stand-ins it never touches
        self._no_map = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((parts, 1), np.int64),
                        np.zeros((parts, 1, 1), np.int64))

    def add(self, base: np.ndarray, runs: list[np.ndarray], row0: int, grid_row: int = 0) -> None:
        target = runs[0]
        if base.dtype == np.float16:  # numba has no float16; widening to float32 is exact
            base, target = base.astype(np.float32), target.astype(np.float32)
        rows = base.shape[0]
        m = self.map
        row_bin, row_counts, col_counts, grid = (m.row_bin[row0:row0 + rows], m.row_counts[row0:row0 + rows],
                                                 m.col_counts, m.grid) if m else self._no_map
        pair_chunk(base, target, base.dtype == np.uint16, self.taus, self.relative, m is not None, row_bin,
                   m.col_bin if m else row_bin, self.hist[0], self.hist[1], self.changed, self.moments, self.max_abs,
                   row_counts, col_counts, grid)
        if self.spectrum is not None:
            self.spectrum.add(widen(target) - widen(base))

    def result(self) -> dict:
        changed = self.changed.sum(0)
        return pair_result(self.hist[0].sum(0), self.hist[1].sum(0), changed[0], changed[1], self.moments.sum(0),
                           self.max_abs.max(), self.map, self.spectrum, self.rows, self.cols)


def widen(x: np.ndarray) -> np.ndarray:
    """float64 copy of a chunk; uint16 is read as bfloat16 bits."""
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)
