"""One-pass CPU kernel for `series` and `overlap`: NumPy row chunks in, MaskAccumulator's record out.

The torch MaskAccumulator (worker.kernels) makes several float64 passes per run and chunk; the C
kernel in `_fastmask.c` reads each element once, does no work for runs whose stored bits did not
move, and counts with popcounts of 16-lane masks. Threads, dtypes and widening as worker.fused
(pair): the same rule picks it (`_Stream.fused`). Without the compiled library, `AVAILABLE` is
False and the torch kernel is used.
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np

from deltalens.worker.contract import MAX_OVERLAP_RUNS
from deltalens.worker.fused import _KINDS, _MIN_PARALLEL, THREADS, _ptr, _run_parallel


def _load_kernel():
    spec = importlib.util.find_spec("deltalens.worker._fastmask")
    if spec is None or not spec.origin:
        return None
    fn = ctypes.CDLL(spec.origin).mask_rows
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    # kind, b, runs, n_runs, n, tau, relative, series, then the accumulators (see _fastmask.c)
    fn.argtypes = [i32, ptr, ptr, i64, i64, ctypes.c_double, i32, i32] + [ptr] * 7
    fn.restype = i32
    return fn


_mask_rows = _load_kernel()
AVAILABLE = _mask_rows is not None


class FusedMaskAccumulator:
    """Masks of several runs at one τ from NumPy row chunks (same record as kernels.MaskAccumulator)."""

    def __init__(self, runs: int, tau: float, relative: bool, series: bool):
        if not series and runs > MAX_OVERLAP_RUNS:
            raise ValueError(f"at most {MAX_OVERLAP_RUNS} runs per overlap")
        self.runs, self.tau, self.relative, self.series = runs, tau, relative, series
        z = lambda *shape, dt=np.int64: np.zeros((THREADS, *shape), dt)  # noqa: E731  one per thread
        self.patterns = z(1 << runs if not series else 1)
        self.same_sign = z(runs, runs)
        self.steps = z(runs, 2)
        self.union = z(2)
        self.first = z(2, runs + 1)
        self.sq_delta = z(runs, dt=np.float64)
        self.sq_base = z(1, dt=np.float64)

    def add(self, base: np.ndarray, runs: list[np.ndarray], row0: int = 0, grid_row: int = 0) -> None:
        if base.dtype == np.float16:  # no float16 in the kernel; widening to float32 is exact
            base, runs = base.astype(np.float32), [r.astype(np.float32) for r in runs]
        base, runs = np.ascontiguousarray(base), [np.ascontiguousarray(r) for r in runs]
        n, kind = base.size, _KINDS[base.dtype]
        parts = THREADS if n >= _MIN_PARALLEL else 1
        bounds = [p * n // parts for p in range(parts + 1)]

        def call(p: int):
            at, count = bounds[p], bounds[p + 1] - bounds[p]
            pointers = (ctypes.c_void_p * self.runs)(*[_ptr(r, at) for r in runs])

            def go():
                if _mask_rows(
                    kind,
                    _ptr(base, at),
                    ctypes.addressof(pointers),
                    self.runs,
                    count,
                    self.tau,
                    int(self.relative),
                    int(self.series),
                    _ptr(self.patterns[p]),
                    _ptr(self.same_sign[p]),
                    _ptr(self.steps[p]),
                    _ptr(self.union[p]),
                    _ptr(self.first[p]),
                    _ptr(self.sq_delta[p]),
                    _ptr(self.sq_base[p]),
                ):
                    raise MemoryError("mask kernel: out of memory")

            return go

        _run_parallel([call(p) for p in range(parts) if bounds[p + 1] > bounds[p]])

    def result(self) -> dict:
        ints = lambda a: a.sum(0).tolist()  # noqa: E731
        return dict(
            patterns=ints(self.patterns),
            steps=ints(self.steps),
            union=ints(self.union),
            sq_delta=self.sq_delta.sum(0).tolist(),
            sq_base=float(self.sq_base.sum()),
            same_sign=ints(self.same_sign),
            first=ints(self.first),
        )
