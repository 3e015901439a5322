"""Per-tensor metric kernels (torch; CPU or CUDA), fed one row chunk at a time.

Exactness rules (docs/ARCHITECTURE.md invariant 3):
  * Δ = t − b, |Δ| > τ and |Δ| > τ·|b| are evaluated in float64 for every input dtype: the same
    IEEE operations as a float64 NumPy reference, so counts agree to the last weight. (float32 is
    not enough: bf16 0.01 minus bf16 -1e-7 rounds in float32 and lands on a bin edge.)
  * Histograms bin a value by its bit pattern on the bfloat16 grid (see contract.BIN_EDGES), so
    "count of values > edge" read from a histogram is exact.
"""

from __future__ import annotations

import itertools

import torch

from deltalens.worker.contract import F64_CELL_OFFSET, FINE_CELLS, FINE_HI, FINE_LO, ULP_BINS, ULP_EXACT
from deltalens.worker.metrics import Spectrum, UpdateMap, pair_result


def fine_cells(x: torch.Tensor) -> torch.Tensor:
    """Fine-histogram slot of each non-negative float64 (see contract): 0 for exact zero, else its
    bfloat16-grid cell (lo, hi], with everything below the first edge and above the last merged.

    (bits - 1) >> 45 keeps sign, exponent and 7 mantissa bits of the value just below x, so a
    value equal to a grid point falls in the cell below it: cells are closed on the right.
    """
    cells = ((x.view(torch.int64) - 1) >> 45) - (F64_CELL_OFFSET + FINE_LO - 1)
    return cells.clamp_(1, FINE_HI - FINE_LO + 1).masked_fill_(x == 0, 0)


def fine_histogram(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(fine_cells(x).flatten(), minlength=FINE_CELLS)[:FINE_CELLS]


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2^n for int64 -1022 <= n <= 1023, from its float64 bits."""
    return ((n + 1023) << 52).view(torch.float64)


def ulp_histogram(a: torch.Tensor, b: torch.Tensor, ulp: tuple[int, int]) -> torch.Tensor:
    """Counts over contract.ULP_EDGES of u = |Δ| / ulp(b), as _fastpair.c's ulp_slot: a = |Δ| and b
    (float64, sign ignored) the base; ulp = (mantissa bits, min exponent) of the base's dtype.
    u = a·2^h·2^(k−h) with ulp(b) = 2^−k: exact, two in-range power-of-two factors."""
    p, emin = ulp
    e = ((b.view(torch.int64) >> 52) & 0x7FF) - 1023
    k = p - e.clamp_min(emin)
    h = torch.div(k, 2, rounding_mode="trunc")
    u = a * _pow2(h) * _pow2(k - h)
    octave = ((u.view(torch.int64) - 1) >> 52) - 1023 + ULP_EXACT - 3  # u in (2^j, 2^(j+1)]
    cells = torch.where(u <= ULP_EXACT, u.ceil().to(torch.int64), octave.clamp_(max=ULP_BINS - 1))
    return torch.bincount(cells.masked_fill_(a == 0, 0).flatten(), minlength=ULP_BINS)


class PairAccumulator:
    """`pair` figures for one matrix from torch row chunks (any device); the per-element work is
    ~15 torch ops. On CPU the one-pass kernel in worker.fused does the same in one sweep."""

    def __init__(
        self,
        rows: int,
        cols: int,
        taus: list[float],
        relative: bool,
        matrix_2d: bool,
        want_rank: bool,
        heads: int | None,
        heads_on_rows: bool,
        device: torch.device,
        ulp: tuple[int, int] | None = None,
    ):
        """ulp: (mantissa bits, min exponent) of the base's stored dtype (contract.ULP_FORMATS), or
        None for no ULP histogram."""
        self.device, self.taus, self.relative, self.ulp = device, taus, relative, ulp
        self.rows, self.cols = rows, cols
        zeros = lambda *shape, dt=torch.int64: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        self.fine = zeros(2, FINE_CELLS)  # [abs, rel] x cell
        self.changed = zeros(2, len(taus))  # [abs, rel] x τ
        self.moments = zeros(3, dt=torch.float64)  # Σ Δ², Σ b², Σ |Δ|
        self.max_abs = zeros(1, dt=torch.float64)
        self.ulp_hist = zeros(ULP_BINS)
        self.map = UpdateMap(rows, cols, heads, heads_on_rows) if matrix_2d else None
        self.spectrum = Spectrum(rows, cols, torch) if matrix_2d and want_rank else None

    def add(self, base: torch.Tensor, runs: list[torch.Tensor], row0: int, grid_row: int) -> None:
        """One row chunk of the base and of the target (runs[0]); rows row0.. lie in map row grid_row."""
        b = base.to(self.device, torch.float64, copy=True)  # own copy: abs_ below must not touch the caller's
        d = runs[0].to(self.device, torch.float64) - b
        a, b = d.abs(), b.abs_()
        ratio = torch.where(a == 0, 0.0, a / b).abs_()  # 0 bin if unchanged, even at b = 0; NaN sign cleared
        self.fine[0] += fine_histogram(a)
        self.fine[1] += fine_histogram(ratio)
        if self.ulp:
            self.ulp_hist += ulp_histogram(a, b, self.ulp)
        self.changed += torch.stack([torch.stack([(a > t).sum(), (a > t * b).sum()]) for t in self.taus], 1)
        self.moments += torch.stack([d.square().sum(), b.square().sum(), a.sum()])
        if a.numel():
            self.max_abs = torch.maximum(self.max_abs, a.max())
        if self.map is not None:
            mask = (a > self.taus[0] * b) if self.relative else (a > self.taus[0])
            self.map.add(mask.sum(1).cpu().numpy(), mask.sum(0).cpu().numpy(), row0, grid_row)
        if self.spectrum is not None:
            self.spectrum.add(d)

    def result(self) -> dict:
        changed = self.changed.cpu().numpy()
        return pair_result(
            self.fine[0].cpu().numpy(),
            self.fine[1].cpu().numpy(),
            changed[0],
            changed[1],
            self.moments.cpu().numpy(),
            self.max_abs.item(),
            self.map,
            self.spectrum,
            self.rows,
            self.cols,
            self.ulp_hist.cpu().numpy() if self.ulp else None,
        )


class MaskAccumulator:
    """Masks M_k = changed(run_k vs base) at one τ for several runs of one matrix.

    overlap: counts every membership pattern (Venn regions; all pairwise figures follow), and per
             pair the weights changed in both with the same sign of Δ.
    series:  per step |M_k| and |M_k ∧ ¬M_final|, plus |∪M| and |∪M ∧ ¬M_final| — O(T), any T; per
             weight the first step it changed at, counted per step and split kept / reverted.
    """

    MAX_OVERLAP_RUNS = 12

    def __init__(self, runs: int, tau: float, relative: bool, series: bool, device: torch.device):
        if not series and runs > self.MAX_OVERLAP_RUNS:
            raise ValueError(f"at most {self.MAX_OVERLAP_RUNS} runs per overlap")
        self.device = device
        self.tau, self.relative, self.runs, self.series = tau, relative, runs, series
        self.patterns = torch.zeros(1 << runs if not series else 1, dtype=torch.int64, device=device)
        self.steps = torch.zeros(runs, 2, dtype=torch.int64, device=device)  # |M_k|, |M_k ∧ ¬M_final|
        self.union = torch.zeros(2, dtype=torch.int64, device=device)  # |∪M|, |∪M ∧ ¬M_final|
        self.sq_delta = torch.zeros(runs, dtype=torch.float64, device=device)
        self.sq_base = torch.zeros(1, dtype=torch.float64, device=device)
        self.same_sign = torch.zeros(runs, runs, dtype=torch.int64, device=device)  # on A ∧ B, per pair
        self.first = torch.zeros(2, runs + 1, dtype=torch.int64, device=device)  # [reverted, kept] x step

    def _mask(self, b: torch.Tensor, run: torch.Tensor, k: int, up: list | None = None) -> torch.Tensor:
        d = run.to(self.device, torch.float64) - b
        self.sq_delta[k] += d.square().sum()
        if up is not None:
            up.append(d > 0)
        a = d.abs_()
        return (a > self.tau * b.abs()) if self.relative else (a > self.tau)

    def _signs(self, masks: list[torch.Tensor], up: list[torch.Tensor]) -> None:
        """Per pair (A, B), weights changed in both whose Δ has the same sign, counted with boolean ops
        (exact, and free of the BLAS threads a float matmul would wake for every chunk)."""
        for i, j in itertools.combinations_with_replacement(range(len(masks)), 2):
            both = (masks[i] & masks[j] & ~(up[i] ^ up[j])).sum()
            self.same_sign[i, j] += both
            if i != j:
                self.same_sign[j, i] += both

    def add(self, base: torch.Tensor, runs: list[torch.Tensor], row0: int = 0, grid_row: int = 0) -> None:
        b = base.to(self.device, torch.float64)
        self.sq_base += b.square().sum()
        if not self.series:
            code = torch.zeros(b.shape, dtype=torch.int32, device=self.device)
            masks, up = [], []
            for k, run in enumerate(runs):
                masks.append(self._mask(b, run, k, up))
                code += masks[-1].to(torch.int32) << k
            self.patterns += torch.bincount(code.flatten(), minlength=1 << self.runs)
            self._signs(masks, up)
            return
        final = self._mask(b, runs[-1], len(runs) - 1)
        not_final = ~final
        union = final.clone()
        first = torch.full(b.shape, len(runs), dtype=torch.int64, device=self.device)  # T: never changed
        for k, run in enumerate(runs):
            mask = final if k == len(runs) - 1 else self._mask(b, run, k)
            first.masked_fill_(mask & (first == len(runs)), k)
            union |= mask
            self.steps[k] += torch.stack([mask.sum(), (mask & not_final).sum()])
        self.union += torch.stack([union.sum(), (union & not_final).sum()])
        # first step each weight changed at, split by whether it is in the final mask
        slots = (first + final * (len(runs) + 1)).flatten()
        self.first += torch.bincount(slots, minlength=2 * (len(runs) + 1)).view(2, -1)

    def result(self) -> dict:
        return dict(
            patterns=self.patterns.tolist(),
            steps=self.steps.tolist(),
            union=self.union.tolist(),
            sq_delta=self.sq_delta.tolist(),
            sq_base=float(self.sq_base.item()),
            same_sign=self.same_sign.tolist(),
            first=self.first.tolist(),  # [not in final mask, in it] x first step changed (T: never)
        )
