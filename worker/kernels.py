"""Per-tensor metric kernels (torch; CPU or CUDA), fed one row chunk at a time.

Exactness rules (ARCHITECTURE.md invariant 3):
  * Δ = t − b, |Δ| > τ and |Δ| > τ·|b| are evaluated in float64 for every input dtype: the same
    IEEE operations as a float64 NumPy reference, so counts agree to the last weight. (float32 is
    not enough: bf16 0.01 minus bf16 -1e-7 rounds in float32 and lands on a bin edge.)
  * Histograms bin a value by its bit pattern on the bfloat16 grid (see contract.BIN_EDGES), so
    "count of values > edge" read from a histogram is exact.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from worker.contract import EDGE_CELLS, FINE_CELLS

FLOAT32_EPS = float(np.finfo(np.float32).eps)
MAP_CELLS = 64          # update map grid: at most 64 x 64
PROFILE_BINS = 1024     # row / column profiles binned to at most this many entries
SPECTRUM_POINTS = 512   # singular spectrum kept at this many points when longer
_EDGE_CELLS = torch.tensor(EDGE_CELLS, dtype=torch.int64)
_F64_TO_CELL = ((1023 - 127) << 7) - 1  # float64 exponent bias shift, mapped to bfloat16-grid cells


def fine_cells(x: torch.Tensor) -> torch.Tensor:
    """Cell of each non-negative float64: 0 for exact zero, else its bfloat16-grid cell (lo, hi].

    (bits - 1) >> 45 keeps sign, exponent and 7 mantissa bits of the value just below x, so a
    value equal to a grid point falls in the cell below it: cells are closed on the right.
    """
    cells = ((x.view(torch.int64) - 1) >> 45) - _F64_TO_CELL
    return cells.clamp_(1, FINE_CELLS).masked_fill_(x == 0, 0)


def fine_histogram(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(fine_cells(x).flatten(), minlength=FINE_CELLS + 1)[: FINE_CELLS + 1]


def coarse_histogram(fine: torch.Tensor) -> list[int]:
    """Fold a fine histogram into contract.BIN_EDGES bins: [0], (0,E0], (E0,E1], ..., (E_last, inf]."""
    cumulative = torch.cumsum(fine.cpu().to(torch.int64), 0)
    at = torch.cat([cumulative[:1], cumulative[_EDGE_CELLS], cumulative[-1:]])
    return torch.diff(at, prepend=torch.zeros(1, dtype=torch.int64)).tolist()


def bin_bounds(length: int, bins: int) -> list[int]:
    """Boundaries splitting `length` items into `bins` near-equal consecutive groups."""
    return [i * length // bins for i in range(bins + 1)]


def binned_sum(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of consecutive groups (at most `bins`) and the group sizes."""
    bounds = np.asarray(bin_bounds(len(values), min(bins, len(values))))
    sums = np.add.reduceat(values, bounds[:-1]) if len(values) else values
    return sums, np.diff(bounds)


# ---------------------------------------------------------------------------------------------
# Singular spectrum of a streamed matrix, through its Gram matrix in float64.
# ---------------------------------------------------------------------------------------------
class Spectrum:
    """Accumulates Δ row chunks; singular values come from eigvalsh of the float64 Gram matrix.

    The Gram route loses accuracy only below sqrt(eps64)·σ_max ≈ 1.5e-8·σ_max, far under the
    rank tolerance σ_max·max(m,n)·eps32, so the rank is the one an SVD would give.
    """

    def __init__(self, rows: int, cols: int, device: torch.device):
        self.rows, self.cols = rows, cols
        self.tall = rows >= cols
        self.gram = torch.zeros(cols, cols, dtype=torch.float64, device=device) if self.tall else None
        self.chunks: list[torch.Tensor] = []

    def add(self, delta: torch.Tensor) -> None:
        if self.tall:
            self.gram.addmm_(delta.T, delta)
        else:
            self.chunks.append(delta.clone())

    def singular_values(self) -> np.ndarray:
        if self.tall:
            gram = self.gram
        else:
            full = torch.cat(self.chunks)
            self.chunks.clear()
            gram = torch.zeros(self.rows, self.rows, dtype=torch.float64, device=full.device)
            step = max(1, (1 << 22) // self.rows)
            for c in range(0, self.cols, step):
                d = full[:, c:c + step]
                gram.addmm_(d, d.T)
        eig = torch.linalg.eigvalsh(gram).clamp_(min=0).flip(0)
        return eig.sqrt().cpu().numpy()


def spectrum_metrics(sigma: np.ndarray, rows: int, cols: int, tolerance: float | None = None) -> dict:
    full = min(rows, cols)
    sigma = np.asarray(sigma, dtype=np.float64)
    top = float(sigma[0]) if len(sigma) else 0.0
    if top == 0.0:
        return dict(rank=0, full_rank=full, rank_pct=0.0, effective_rank=0.0, stable_rank=0.0, rank90=0, rank99=0,
                    spectrum=_downsample(sigma))
    tol = tolerance if tolerance is not None else top * max(rows, cols) * FLOAT32_EPS
    energy = np.cumsum(sigma ** 2)
    p = sigma[sigma > 0] / sigma.sum()
    return dict(
        rank=int((sigma > tol).sum()), full_rank=full, rank_pct=float((sigma > tol).sum() / full * 100),
        effective_rank=float(np.exp(-(p * np.log(p)).sum())), stable_rank=float(energy[-1] / top ** 2),
        rank90=int(np.searchsorted(energy, 0.9 * energy[-1]) + 1), rank99=int(np.searchsorted(energy, 0.99 * energy[-1]) + 1),
        spectrum=_downsample(sigma))


def _downsample(sigma: np.ndarray) -> tuple[list[int], list[float]]:
    if len(sigma) <= SPECTRUM_POINTS:
        idx = np.arange(len(sigma))
    else:
        idx = np.unique(np.round(np.geomspace(1, len(sigma), SPECTRUM_POINTS)).astype(int) - 1)
    return idx.tolist(), sigma[idx].tolist()


# ---------------------------------------------------------------------------------------------
# Update map: where in the matrix the changed weights are.
# ---------------------------------------------------------------------------------------------
class UpdateMap:
    def __init__(self, rows: int, cols: int, heads: int | None, heads_on_rows: bool, device: torch.device):
        self.rows, self.cols = rows, cols
        self.grid_rows, self.grid_cols = min(MAP_CELLS, rows), min(MAP_CELLS, cols)
        self.row_edges = bin_bounds(rows, self.grid_rows)
        col_edges = bin_bounds(cols, self.grid_cols)
        self.col_bin = torch.repeat_interleave(torch.arange(self.grid_cols), torch.tensor(np.diff(col_edges))).to(device)
        self.row_counts = torch.zeros(rows, dtype=torch.int64, device=device)
        self.col_counts = torch.zeros(cols, dtype=torch.int64, device=device)
        self.grid = torch.zeros(self.grid_rows, self.grid_cols, dtype=torch.int64, device=device)
        self.heads, self.heads_on_rows = heads, heads_on_rows

    def add(self, mask: torch.Tensor, row0: int, grid_row: int) -> None:
        """mask: (rows, cols) bool for part rows row0.. — all inside grid row `grid_row`."""
        col_sum = mask.sum(0)
        self.row_counts[row0:row0 + mask.shape[0]] = mask.sum(1)
        self.col_counts += col_sum
        self.grid[grid_row].index_add_(0, self.col_bin, col_sum)

    def result(self) -> dict:
        rows_n, cols_n = self.row_counts.cpu().numpy(), self.col_counts.cpu().numpy()
        cell_rows = np.diff(self.row_edges)
        cell_cols = np.bincount(self.col_bin.cpu().numpy(), minlength=self.grid_cols)
        cells = self.grid.cpu().numpy() / np.outer(cell_rows, cell_cols)
        row_sum, row_size = binned_sum(rows_n, PROFILE_BINS)
        col_sum, col_size = binned_sum(cols_n, PROFILE_BINS)
        head_frac = None
        axis_counts, axis_len, other = (rows_n, self.rows, self.cols) if self.heads_on_rows else (cols_n, self.cols, self.rows)
        if self.heads and axis_len % self.heads == 0:
            per_head = axis_counts.reshape(self.heads, -1).sum(1)
            head_frac = (per_head / (axis_len // self.heads * other)).tolist()
        return dict(grid_rows=self.grid_rows, grid_cols=self.grid_cols, cells=cells.ravel().tolist(),
                    row_frac=(row_sum / (row_size * self.cols)).tolist(), col_frac=(col_sum / (col_size * self.rows)).tolist(),
                    head_frac=head_frac)


# ---------------------------------------------------------------------------------------------
# Accumulators: one per analysed matrix, fed aligned row chunks of every checkpoint.
# ---------------------------------------------------------------------------------------------
class PairAccumulator:
    """Everything `pair` reports for one matrix: counts, histograms, magnitudes, map, spectrum."""

    def __init__(self, rows: int, cols: int, taus: list[float], relative: bool,
                 matrix_2d: bool, want_rank: bool, heads: int | None, heads_on_rows: bool, device: torch.device):
        self.device = device
        self.taus, self.relative = taus, relative
        self.rows, self.cols = rows, cols
        zeros = lambda n, dt=torch.int64: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
        self.fine_abs, self.fine_rel = zeros(FINE_CELLS + 1), zeros(FINE_CELLS + 1)
        self.changed_abs, self.changed_rel = zeros(len(taus)), zeros(len(taus))
        self.moments = zeros(3, torch.float64)  # Σ Δ², Σ b², Σ |Δ|
        self.max_abs = zeros(1, torch.float64)
        self.map = UpdateMap(rows, cols, heads, heads_on_rows, device) if matrix_2d else None
        self.spectrum = Spectrum(rows, cols, device) if matrix_2d and want_rank else None

    def add(self, base: torch.Tensor, runs: list[torch.Tensor], row0: int, grid_row: int) -> None:
        """One row chunk of the base and of the target (runs[0]); rows row0.. lie in map row grid_row."""
        b = base.to(self.device, torch.float64)
        d = runs[0].to(self.device, torch.float64) - b
        a, b = d.abs(), b.abs_()
        self.fine_abs += fine_histogram(a)
        self.changed_abs += torch.stack([(a > t).sum() for t in self.taus])
        ratio = torch.nan_to_num_(a / b, nan=0.0, posinf=math.inf)  # 0/0 -> 0: unchanged
        self.fine_rel += fine_histogram(ratio)
        self.changed_rel += torch.stack([(a > t * b).sum() for t in self.taus])
        self.moments += torch.stack([d.square().sum(), b.square().sum(), a.sum()])
        if a.numel():
            self.max_abs = torch.maximum(self.max_abs, a.max())
        if self.map is not None:
            mask = (a > self.taus[0] * b) if self.relative else (a > self.taus[0])
            self.map.add(mask, row0, grid_row)
        if self.spectrum is not None:
            self.spectrum.add(d)

    def result(self) -> dict:
        sq_delta, sq_base, abs_sum = self.moments.tolist()
        out = dict(
            changed_abs=self.changed_abs.tolist(), changed_rel=self.changed_rel.tolist(),
            hist_abs=coarse_histogram(self.fine_abs), hist_rel=coarse_histogram(self.fine_rel),
            norm_delta=math.sqrt(sq_delta), norm_base=math.sqrt(sq_base), sum_abs_delta=abs_sum,
            max_abs_delta=float(self.max_abs.item()), sq_delta=sq_delta, sq_base=sq_base,
        )
        if self.map is not None:
            out["update_map"] = self.map.result()
        if self.spectrum is not None:
            out.update(spectrum_metrics(self.spectrum.singular_values(), self.rows, self.cols))
        return out


class MaskAccumulator:
    """Masks M_k = changed(run_k vs base) at one τ for several runs of one matrix.

    overlap: counts every membership pattern (Venn regions; all pairwise figures follow).
    series:  per step |M_k| and |M_k ∧ ¬M_final|, plus |∪M| and |∪M ∧ ¬M_final| — O(T), any T.
    """

    MAX_OVERLAP_RUNS = 12

    def __init__(self, runs: int, tau: float, relative: bool, series: bool, device: torch.device):
        if not series and runs > self.MAX_OVERLAP_RUNS:
            raise ValueError(f"at most {self.MAX_OVERLAP_RUNS} runs per overlap")
        self.device = device
        self.tau, self.relative, self.runs, self.series = tau, relative, runs, series
        self.patterns = torch.zeros(1 << runs if not series else 1, dtype=torch.int64, device=device)
        self.steps = torch.zeros(runs, 2, dtype=torch.int64, device=device)   # |M_k|, |M_k ∧ ¬M_final|
        self.union = torch.zeros(2, dtype=torch.int64, device=device)         # |∪M|, |∪M ∧ ¬M_final|
        self.sq_delta = torch.zeros(runs, dtype=torch.float64, device=device)
        self.sq_base = torch.zeros(1, dtype=torch.float64, device=device)

    def _mask(self, b: torch.Tensor, run: torch.Tensor, k: int) -> torch.Tensor:
        d = run.to(self.device, torch.float64) - b
        self.sq_delta[k] += d.square().sum()
        a = d.abs_()
        return (a > self.tau * b.abs()) if self.relative else (a > self.tau)

    def add(self, base: torch.Tensor, runs: list[torch.Tensor], row0: int = 0, grid_row: int = 0) -> None:
        b = base.to(self.device, torch.float64)
        self.sq_base += b.square().sum()
        if not self.series:
            code = torch.zeros(b.shape, dtype=torch.int32, device=self.device)
            for k, run in enumerate(runs):
                code += self._mask(b, run, k).to(torch.int32) << k
            self.patterns += torch.bincount(code.flatten(), minlength=1 << self.runs)
            return
        final = self._mask(b, runs[-1], len(runs) - 1)
        not_final = ~final
        union = final.clone()
        for k, run in enumerate(runs):
            mask = final if k == len(runs) - 1 else self._mask(b, run, k)
            union |= mask
            self.steps[k] += torch.stack([mask.sum(), (mask & not_final).sum()])
        self.union += torch.stack([union.sum(), (union & not_final).sum()])

    def result(self) -> dict:
        return dict(patterns=self.patterns.tolist(), steps=self.steps.tolist(), union=self.union.tolist(),
                    sq_delta=self.sq_delta.tolist(), sq_base=float(self.sq_base.item()))
