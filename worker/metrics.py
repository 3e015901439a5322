"""Backend-neutral pieces of the metrics: histogram folding, update maps, spectra (NumPy only).

Both kernels — torch (worker.kernels) and the one-pass CPU kernel (worker.fused) — accumulate
into these, so the reported figures are built by one piece of code.
"""

from __future__ import annotations

import numpy as np

from deltalens.worker.contract import EDGE_CELLS, FINE_CELLS

FLOAT32_EPS = float(np.finfo(np.float32).eps)
MAP_CELLS = 64  # update map grid: at most 64 x 64
PROFILE_BINS = 1024  # row / column profiles binned to at most this many entries
SPECTRUM_POINTS = 512  # singular spectrum kept at this many points when longer
_EDGE_CELLS = np.asarray(EDGE_CELLS, dtype=np.int64)


def coarse_histogram(fine: np.ndarray) -> list[int]:
    """Fold a fine histogram (contract.FINE_CELLS slots) into contract.BIN_EDGES bins:
    [0], (0,E0], (E0,E1], ..., (E_last, inf]."""
    cumulative = np.cumsum(np.asarray(fine, dtype=np.int64)[:FINE_CELLS])
    at = np.concatenate([cumulative[:1], cumulative[_EDGE_CELLS], cumulative[-1:]])
    return np.diff(at, prepend=0).tolist()


def bin_bounds(length: int, bins: int) -> list[int]:
    """Boundaries splitting `length` items into `bins` near-equal consecutive groups."""
    return [i * length // bins for i in range(bins + 1)]


def bin_index(length: int, bins: int) -> np.ndarray:
    """For each item, the group of bin_bounds(length, bins) it falls in."""
    return np.repeat(np.arange(bins), np.diff(bin_bounds(length, bins)))


def binned_sum(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of consecutive groups (at most `bins`) and the group sizes."""
    bounds = np.asarray(bin_bounds(len(values), min(bins, len(values))))
    sums = np.add.reduceat(values, bounds[:-1]) if len(values) else values
    return sums, np.diff(bounds)


class UpdateMap:
    """Where in a matrix the changed weights are: a ≤64×64 grid, row/column/head profiles.

    Counts are kept per partition (first axis of col_counts and grid) so parallel kernels can
    write without sharing; result() adds them up.
    """

    def __init__(self, rows: int, cols: int, heads: int | None, heads_on_rows: bool, partitions: int = 1):
        self.rows, self.cols = rows, cols
        self.grid_rows, self.grid_cols = min(MAP_CELLS, rows), min(MAP_CELLS, cols)
        self.row_bin, self.col_bin = bin_index(rows, self.grid_rows), bin_index(cols, self.grid_cols)
        self.row_counts = np.zeros(rows, dtype=np.int64)
        self.col_counts = np.zeros((partitions, cols), dtype=np.int64)
        self.grid = np.zeros((partitions, self.grid_rows, self.grid_cols), dtype=np.int64)
        self.heads, self.heads_on_rows = heads, heads_on_rows

    def add(self, row_sums: np.ndarray, col_sums: np.ndarray, row0: int, grid_row: int) -> None:
        """Changed counts per row and per column of rows row0.., all inside map row `grid_row`."""
        self.row_counts[row0 : row0 + len(row_sums)] = row_sums
        self.col_counts[0] += col_sums
        self.grid[0, grid_row] += np.bincount(
            self.col_bin, weights=col_sums, minlength=self.grid_cols
        ).astype(np.int64)

    def result(self) -> dict:
        rows_n, cols_n, grid = self.row_counts, self.col_counts.sum(0), self.grid.sum(0)
        cells = grid / np.outer(np.bincount(self.row_bin), np.bincount(self.col_bin))
        row_sum, row_size = binned_sum(rows_n, PROFILE_BINS)
        col_sum, col_size = binned_sum(cols_n, PROFILE_BINS)
        head_frac = None
        axis_counts, axis_len, other = (
            (rows_n, self.rows, self.cols) if self.heads_on_rows else (cols_n, self.cols, self.rows)
        )
        if self.heads and axis_len % self.heads == 0:
            per_head = axis_counts.reshape(self.heads, -1).sum(1)
            head_frac = (per_head / (axis_len // self.heads * other)).tolist()
        return dict(
            grid_rows=self.grid_rows,
            grid_cols=self.grid_cols,
            cells=cells.ravel().tolist(),
            row_frac=(row_sum / (row_size * self.cols)).tolist(),
            col_frac=(col_sum / (col_size * self.rows)).tolist(),
            head_frac=head_frac,
        )


class Spectrum:
    """Singular values of a matrix streamed as float64 row chunks, via its Gram matrix.

    Works on NumPy arrays or torch tensors alike (pass the module as `xp`). The Gram route
    loses accuracy only below sqrt(eps64)·σ_max ≈ 1.5e-8·σ_max, far under the rank tolerance
    σ_max·max(m,n)·eps32, so the rank is the one an SVD would give.

    Cost: one Gram on the smaller side, which NumPy hands to BLAS as DSYRK (A·Aᵀ of one array),
    plus eigvalsh — the floor bench/rank.py measures against. Tall matrices fold each chunk into
    ΔᵀΔ as it comes; wide ones (ΔΔᵀ needs every row) fill one preallocated float64 buffer, then
    take a single DSYRK over the whole width: no chunk list, no concatenated copy.
    """

    def __init__(self, rows: int, cols: int, xp):
        self.rows, self.cols, self.xp = rows, cols, xp
        self.tall = rows >= cols
        self.gram = None
        self.full = None  # wide: Δ, filled row by row
        self.filled = 0
        self._scratch: np.ndarray | None = None  # tall, NumPy: the chunk buffer add_pair reuses

    def add(self, delta) -> None:
        """delta: a float64 (rows, cols) chunk of Δ, the next rows in order."""
        if self.tall:
            self._fold(delta)
        else:
            self._next_rows(len(delta), delta)[:] = delta

    def add_pair(self, base: np.ndarray, target: np.ndarray) -> None:
        """The next rows as the NumPy chunks the fused kernel read (bf16 as uint16 bits): Δ is
        converted to float64 in one pass, straight into the buffer it is used from."""
        n = len(base)
        if not self.tall:
            delta64(base, target, self._next_rows(n, None))
            return
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = np.empty((n, self.cols))
        self._fold(delta64(base, target, self._scratch[:n]))

    def _fold(self, delta) -> None:
        with np.errstate(all="ignore"):  # NaN/Inf deltas are refused after the pass, not warned about here
            if self.gram is None:
                self.gram = delta.T @ delta
            else:
                self.gram += delta.T @ delta

    def _next_rows(self, n: int, like):
        """Wide: the buffer rows the next n rows of Δ go to (allocated on first use, on like's device)."""
        if self.full is None:
            shape = (self.rows, self.cols)
            self.full = like.new_empty(shape) if hasattr(like, "new_empty") else np.empty(shape)
        self.filled += n
        return self.full[self.filled - n : self.filled]

    def singular_values(self) -> np.ndarray:
        gram = self.gram
        if not self.tall:  # Δ Δᵀ (rows x rows): one DSYRK over all columns
            with np.errstate(all="ignore"):
                gram = self.full @ self.full.T
            self.full = None
        self._scratch = None
        eig = self.xp.linalg.eigvalsh(gram)
        eig = np.asarray(eig.cpu() if hasattr(eig, "cpu") else eig, dtype=np.float64)
        return np.sqrt(np.clip(eig[::-1], 0, None))


def as_float32(x: np.ndarray) -> np.ndarray:
    """A NumPy chunk in a dtype that float64 holds exactly and NumPy computes in: bfloat16 bits
    (uint16) become float32 in one pass; other floats are returned as they are."""
    return np.left_shift(x, 16, dtype=np.uint32).view(np.float32) if x.dtype == np.uint16 else x


def delta64(base: np.ndarray, target: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float64(target) − float64(base), written to `out`: NumPy casts each operand to float64 in
    its buffered loop, so this is the float64 reference's Δ without float64 copies of the inputs."""
    return np.subtract(as_float32(target), as_float32(base), out=out, dtype=np.float64)


def spectrum_metrics(sigma: np.ndarray, rows: int, cols: int, tolerance: float | None = None) -> dict:
    full = min(rows, cols)
    sigma = np.asarray(sigma, dtype=np.float64)
    top = float(sigma[0]) if len(sigma) else 0.0
    if top == 0.0:
        return dict(
            rank=0,
            full_rank=full,
            rank_pct=0.0,
            effective_rank=0.0,
            stable_rank=0.0,
            rank90=0,
            rank99=0,
            spectrum=_downsample(sigma),
        )
    tol = tolerance if tolerance is not None else top * max(rows, cols) * FLOAT32_EPS
    energy = np.cumsum(sigma**2)
    p = sigma[sigma > 0] / sigma.sum()
    rank = int((sigma > tol).sum())
    return dict(
        rank=rank,
        full_rank=full,
        rank_pct=rank / full * 100,
        effective_rank=float(np.exp(-(p * np.log(p)).sum())),
        stable_rank=float(energy[-1] / top**2),
        rank90=int(np.searchsorted(energy, 0.9 * energy[-1]) + 1),
        rank99=int(np.searchsorted(energy, 0.99 * energy[-1]) + 1),
        spectrum=_downsample(sigma),
    )


def _downsample(sigma: np.ndarray) -> tuple[list[int], list[float]]:
    if len(sigma) <= SPECTRUM_POINTS:
        idx = np.arange(len(sigma))
    else:
        idx = np.unique(np.round(np.geomspace(1, len(sigma), SPECTRUM_POINTS)).astype(int) - 1)
    return idx.tolist(), sigma[idx].tolist()


def pair_result(
    fine_abs,
    fine_rel,
    changed_abs,
    changed_rel,
    moments,
    max_abs,
    update_map,
    spectrum,
    rows,
    cols,
    ulp_hist=None,
) -> dict:
    """The per-matrix record both pair kernels return (ulp_hist: counts over contract.ULP_EDGES, or
    None where the base's dtype has no ULP histogram)."""
    sq_delta, sq_base, abs_sum = (float(x) for x in moments)
    out = dict(
        changed_abs=[int(c) for c in changed_abs],
        changed_rel=[int(c) for c in changed_rel],
        hist_abs=coarse_histogram(fine_abs),
        hist_rel=coarse_histogram(fine_rel),
        norm_delta=float(np.sqrt(sq_delta)),
        norm_base=float(np.sqrt(sq_base)),
        sum_abs_delta=abs_sum,
        max_abs_delta=float(max_abs),
        sq_delta=sq_delta,
        sq_base=sq_base,
    )
    if ulp_hist is not None:
        out["ulp_hist"] = [int(c) for c in ulp_hist]
    if update_map is not None:
        out["update_map"] = update_map.result()
    if spectrum is not None and np.isfinite(sq_delta):  # non-finite Δ: refused by the caller, no spectrum
        out.update(spectrum_metrics(spectrum.singular_values(), rows, cols))
    return out
