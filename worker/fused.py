"""One-pass CPU kernel for `pair`: NumPy row chunks in, every per-element figure out.

The torch kernel (worker.kernels) makes ~15 passes over each chunk; the C kernel in
`_fastpair.c` reads each element once, keeps every intermediate in registers and does no work
for weights that did not move. It is compiled by `pip install` and called through ctypes, which
releases the GIL, so one Python thread per core runs its own block of rows. No torch on this
path. Same float64 arithmetic and bins as the torch kernel: identical counts (the tests run
both against the NumPy reference). Without the compiled library, `AVAILABLE` is False and the
torch kernel is used.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from deltalens.worker.contract import F64_CELL_OFFSET, FINE_CELLS, FINE_HI, FINE_LO, ULP_BINS
from deltalens.worker.metrics import Spectrum, UpdateMap, pair_result

# dtypes (safetensors spelling) the kernel reads, as NumPy holds them (float16 is widened first)
DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
_KINDS = {np.dtype(np.uint16): 0, np.dtype(np.float32): 1, np.dtype(np.float64): 2}
_SLOT_OFFSET, _TOP_SLOT = F64_CELL_OFFSET + FINE_LO - 1, FINE_HI - FINE_LO + 1
MAX_TAUS = 16  # as _fastpair.c
_MIN_PARALLEL = 1 << 16  # elements below which one thread does the whole chunk


def _load_kernel():
    spec = importlib.util.find_spec("deltalens.worker._fastpair")
    if spec is None or not spec.origin:
        return None
    fn = ctypes.CDLL(spec.origin).pair_rows
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [
        ctypes.c_int,
        ptr,
        ptr,
        i64,
        i64,
        ptr,
        i64,
        ctypes.c_int,
        ctypes.c_int,
        ptr,
        ptr,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        i64,
        i64,  # ulp_p (< 0: no ULP histogram)
        i64,  # ulp_emin
        ptr,  # ulp_hist
    ]
    fn.restype = None
    return fn


_pair_rows = _load_kernel()
AVAILABLE = _pair_rows is not None
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def _run_parallel(calls: list) -> None:
    global _pool
    if len(calls) == 1:
        calls[0]()
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="deltalens-kernel")
    for future in [_pool.submit(c) for c in calls]:
        future.result()


def _ptr(array: np.ndarray, offset_items: int = 0) -> int:
    return array.ctypes.data + offset_items * array.itemsize


def _continues(run: list, base: np.ndarray, target: np.ndarray, row0: int) -> bool:
    """Whether chunks base, target (contiguous) are the rows right after the pending run's, in memory too."""
    first_b, first_t, first_row, rows, _ = run
    step = first_b.shape[1] * first_b.itemsize
    return (
        base.dtype == first_b.dtype
        and base.shape[1] == first_b.shape[1]
        and row0 == first_row + rows
        and base.ctypes.data == first_b.ctypes.data + rows * step
        and target.ctypes.data == first_t.ctypes.data + rows * step
    )


class FusedPairAccumulator:
    """`pair` figures for one matrix from NumPy row chunks (same record as kernels.PairAccumulator)."""

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
        ulp: tuple[int, int] | None = None,
    ):
        """ulp: (mantissa bits, min exponent) of the base's stored dtype (contract.ULP_FORMATS), or
        None for no ULP histogram."""
        parts = THREADS
        self.ulp = ulp
        self.ulp_hist = np.zeros((parts, ULP_BINS), dtype=np.int64)
        self.rows, self.cols, self.relative = rows, cols, relative
        self.taus = np.asarray(taus, dtype=np.float64)
        self.hist = np.zeros((2, parts, FINE_CELLS), dtype=np.int64)
        self.changed = np.zeros((parts, 2, len(taus)), dtype=np.int64)
        self.moments = np.zeros((parts, 3))
        self.max_abs = np.zeros(parts)
        self.map = UpdateMap(rows, cols, heads, heads_on_rows, parts) if matrix_2d else None
        self.spectrum = Spectrum(rows, cols, np) if matrix_2d and want_rank else None
        if self.map is None:  # the kernel still wants map buffers; give it small ones it never touches
            self._sink = np.zeros((parts, max(cols, 1)), np.int64)
        # [base, target, row0, rows, chunks]: rows from base's first row on, not run yet
        self._pending: list | None = None

    def add(self, base: np.ndarray, runs: list[np.ndarray], row0: int, grid_row: int = 0) -> None:
        """The next rows (row0..). A chunk that continues the last one in memory (the next rows of
        one array, as the reader cuts a matrix) joins it: the kernel runs once per such run, at the
        first chunk that does not continue it or at result(), on halves of the whole run instead of
        on halves of every chunk, with one wait instead of one per chunk."""
        target = runs[0]
        if base.dtype == np.float16:  # no float16 in the kernel; widening to float32 is exact
            self._flush()
            base, target = base.astype(np.float32), target.astype(np.float32)
        base, target = np.ascontiguousarray(base), np.ascontiguousarray(target)
        if self.spectrum is not None:
            self.spectrum.add_pair(base, target)
        run = self._pending
        if run is not None and not _continues(run, base, target, row0):
            self._flush()
            run = None
        if run is None:
            self._pending = run = [base, target, row0, 0, []]
        run[3] += base.shape[0]
        run[4].append((base, target))  # alive until the run is done
        if base.base is None or target.base is None:  # a copy: run now rather than hold every copy
            self._flush()

    def _flush(self) -> None:
        """Runs the kernel on the pending run of rows, on THREADS threads, and waits for it."""
        if self._pending is None:
            return
        base, target, row0, rows, chunks = self._pending  # chunks: the memory the kernel reads
        self._pending = None
        cols, kind = base.shape[1], _KINDS[base.dtype]
        m = self.map
        parts = len(self.max_abs) if rows * cols >= _MIN_PARALLEL else 1
        bounds = [p * rows // parts for p in range(parts + 1)]

        def call(p: int):
            r0, n = bounds[p], bounds[p + 1] - bounds[p]
            col_counts = m.col_counts[p] if m else self._sink[p]
            return lambda: _pair_rows(
                kind,
                _ptr(base, r0 * cols),
                _ptr(target, r0 * cols),
                n,
                cols,
                _ptr(self.taus),
                len(self.taus),
                int(self.relative),
                int(m is not None),
                _ptr(m.row_bin, row0 + r0) if m else 0,
                _ptr(m.col_bin) if m else 0,
                _SLOT_OFFSET,
                _TOP_SLOT,
                _ptr(self.hist[0, p]),
                _ptr(self.hist[1, p]),
                _ptr(self.changed[p]),
                _ptr(self.moments[p]),
                _ptr(self.max_abs, p),
                _ptr(m.row_counts, row0 + r0) if m else 0,
                _ptr(col_counts),
                _ptr(m.grid[p]) if m else _ptr(col_counts),
                m.grid_cols if m else 0,
                self.ulp[0] if self.ulp else -1,
                self.ulp[1] if self.ulp else 0,
                _ptr(self.ulp_hist[p]),
            )

        _run_parallel([call(p) for p in range(parts) if bounds[p + 1] > bounds[p]])
        del chunks  # released only once the kernel is done with them

    def result(self) -> dict:
        self._flush()
        changed = self.changed.sum(0)
        return pair_result(
            self.hist[0].sum(0),
            self.hist[1].sum(0),
            changed[0],
            changed[1],
            self.moments.sum(0),
            self.max_abs.max(),
            self.map,
            self.spectrum,
            self.rows,
            self.cols,
            self.ulp_hist.sum(0) if self.ulp else None,
        )


def widen(x: np.ndarray) -> np.ndarray:
    """float64 copy of a chunk; uint16 is read as bfloat16 bits."""
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)
