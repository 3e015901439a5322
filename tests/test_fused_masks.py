"""The one-pass mask kernel (worker/_fastmask.c) against the torch MaskAccumulator and float64 NumPy.

Straight into FusedMaskAccumulator: randomized chunks of every element kind, 2–5 runs, both τ modes,
series and overlap, with -0, subnormals, runs that leave a value's bits alone, a change of exactly
τ, odd widths, a 1×1 matrix and chunks big enough for several threads. Counts equal to the last
weight, sums to 1e-12. NaN and ±Inf: the same counts as the torch kernel, and ΣΔ², Σb² non-finite
exactly where the torch kernel's are (the caller refuses such tensors from those sums). Then
`series` and `overlap` on tiny real checkpoints give the same document with the kernel and without.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from test_fastpair import bf16, values

from deltalens.worker import fused_masks
from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.kernels import MaskAccumulator

pytestmark = pytest.mark.skipif(not fused_masks.AVAILABLE, reason="C kernel not built")

TAU = 2.0**-10  # a power of two: Δ = τ exactly occurs (and is not a change)
KINDS = {"BF16": np.float32, "F16": np.float16, "F32": np.float32, "F64": np.float64}
TINY = {"BF16": 1e-39, "F16": 1e-6, "F32": 1e-40, "F64": 1e-310}  # subnormals
SHAPES = [(1, 1), (3, 17), (5, 31), (2, 15), (64, 33), (300, 257)]  # the last one runs on threads
COUNTS = ("patterns", "steps", "union", "same_sign", "first")


def store(x: np.ndarray, kind: str) -> np.ndarray:
    """float64 values as the checkpoint readers hand them over (bfloat16 as bits)."""
    return bf16(x) if kind == "BF16" else x.astype(KINDS[kind])


def torch_of(a: np.ndarray) -> torch.Tensor:
    bf16_bits = a.dtype == np.uint16
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if bf16_bits else torch.from_numpy(a)


def chunks(kind: str, shape: tuple[int, int], runs: int, seed: int) -> list[np.ndarray]:
    """[base, *runs] in the kernel's input dtype: each run moves its own share of values by sizes
    around τ, sets some to exactly b ± τ, flips the sign of zeros and keeps the rest bit for bit."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(shape) * 0.02
    b[rng.random(shape) < 0.05] = 0.0
    b[rng.random(shape) < 0.05] = -0.0
    b[rng.random(shape) < 0.05] = TINY[kind] * rng.choice([-1, 1])
    base = store(b, kind)
    b = values(base, kind)
    out = [base]
    for _ in range(runs):
        share = rng.choice([0.0, 0.1, 0.6, 1.0])
        step = np.exp2(rng.uniform(-16, -4, shape)) * rng.choice([-1, 1], shape)
        t = np.where(rng.random(shape) < share, b + step, b)
        t = np.where(rng.random(shape) < 0.05, b + TAU * rng.choice([-1, 1], shape), t)
        t = np.where((b == 0) & (rng.random(shape) < 0.5), -b, t)
        out.append(store(t, kind))
    return out


def numpy_record(base: np.ndarray, runs: list[np.ndarray], kind: str, relative: bool, series: bool) -> dict:
    """MaskAccumulator.result() computed with plain float64 NumPy, element by element."""
    b = values(base, kind).ravel()
    deltas = [values(r, kind).ravel() - b for r in runs]
    masks = [np.abs(d) > (TAU * np.abs(b) if relative else TAU) for d in deltas]
    R, n = len(runs), b.size
    rec = dict(
        patterns=[0] * (1 << R if not series else 1),
        steps=[[0, 0] for _ in range(R)],
        union=[0, 0],
        same_sign=[[0] * R for _ in range(R)],
        first=[[0] * (R + 1) for _ in range(2)],
        sq_delta=[float((d * d).sum()) for d in deltas],
        sq_base=float((b * b).sum()),
    )
    for e in range(n):
        m = [bool(mk[e]) for mk in masks]
        if series:
            final = m[-1]
            for k in range(R):
                rec["steps"][k][0] += m[k]
                rec["steps"][k][1] += m[k] and not final
            rec["union"][0] += any(m)
            rec["union"][1] += any(m) and not final
            rec["first"][final][m.index(True) if any(m) else R] += 1
        else:
            rec["patterns"][sum(x << k for k, x in enumerate(m))] += 1
            for i, j in itertools.product(range(R), repeat=2):
                rec["same_sign"][i][j] += m[i] and m[j] and (deltas[i][e] > 0) == (deltas[j][e] > 0)
    return rec


def fused_record(chunk: list[np.ndarray], relative: bool, series: bool, rows_per_add: int) -> dict:
    acc = fused_masks.FusedMaskAccumulator(len(chunk) - 1, TAU, relative, series)
    for r in range(0, chunk[0].shape[0], rows_per_add):
        acc.add(chunk[0][r : r + rows_per_add], [c[r : r + rows_per_add] for c in chunk[1:]])
    return acc.result()


def torch_record(chunk: list[np.ndarray], relative: bool, series: bool) -> dict:
    acc = MaskAccumulator(len(chunk) - 1, TAU, relative, series, torch.device("cpu"))
    acc.add(torch_of(chunk[0]), [torch_of(c) for c in chunk[1:]])
    return acc.result()


def assert_same(got: dict, want: dict) -> None:
    for key in COUNTS:
        assert got[key] == want[key], key
    assert got["sq_delta"] == pytest.approx(want["sq_delta"], rel=1e-12, abs=0)
    assert got["sq_base"] == pytest.approx(want["sq_base"], rel=1e-12, abs=0)


CASES = [
    (kind, shape, runs, relative, series)
    for kind, (shape, runs) in itertools.product(KINDS, zip(SHAPES, itertools.cycle(range(2, 6))))
    for relative, series in itertools.product([False, True], repeat=2)
]


@pytest.mark.parametrize("kind,shape,runs,relative,series", CASES)
def test_kernel_matches_torch_and_numpy(kind, shape, runs, relative, series):
    seed = abs(hash((kind, shape, runs, relative, series))) % 2**32
    chunk = chunks(kind, shape, runs, seed)
    got = fused_record(chunk, relative, series, rows_per_add=max(1, shape[0] // 3))  # several adds
    want = torch_record(chunk, relative, series)
    assert_same(got, want)
    if shape[0] * shape[1] <= 4096:  # the element-by-element reference is slow
        assert_same(got, numpy_record(chunk[0], chunk[1:], kind, relative, series))
    assert sum(got["patterns"]) == (0 if series else shape[0] * shape[1])
    assert sum(map(sum, got["first"])) == (shape[0] * shape[1] if series else 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("series", [False, True])
def test_nan_and_inf_count_as_in_torch(kind, series):
    """NaN and ±Inf in the base (same bits in a run, or not) and in runs: counts equal, and the sums
    are non-finite exactly where the torch kernel's are."""
    specials = [np.nan, np.inf, -np.inf]
    for seed, (where, value) in enumerate(itertools.product(["base", "run", "both"], specials)):
        chunk = chunks(kind, (7, 21), 3, seed)
        with np.errstate(invalid="ignore", over="ignore"):
            bad = store(np.array([value]), kind)[0]
        if where in ("base", "both"):
            chunk[0][2, 5] = bad
            if where == "both":
                chunk[1][2, 5] = bad  # equal bits: Δ = NaN all the same
        else:
            chunk[2][4, 20] = bad
        got, want = fused_record(chunk, False, series, 7), torch_record(chunk, False, series)
        for key in COUNTS:
            assert got[key] == want[key], (where, value, key)
        assert [math.isfinite(x) for x in got["sq_delta"]] == [math.isfinite(x) for x in want["sq_delta"]]
        assert math.isfinite(got["sq_base"]) == math.isfinite(want["sq_base"])
        assert not all(map(math.isfinite, [*got["sq_delta"], got["sq_base"]]))


def test_too_many_overlap_runs():
    with pytest.raises(ValueError, match="at most 12"):
        fused_masks.FusedMaskAccumulator(13, TAU, False, False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """bf16 llama (base + 4 steps) and float16 qwen2 (base + 3 runs)."""
    from conftest import variants

    root = tmp_path_factory.mktemp("fused_masks")
    return {
        "series": variants("llama", root / "llama", {f"s{s}": (200 + s, 0.1 * s) for s in range(1, 5)}),
        "overlap": variants("qwen2", root / "qwen2", {f"r{s}": (300 + s, 0.3) for s in range(3)}),
    }


@pytest.mark.parametrize("kind", ["series", "overlap"])
@pytest.mark.parametrize("relative", [False, True])
def test_documents_equal_with_and_without_the_kernel(checkpoints, kind, relative, monkeypatch):
    paths = [str(p) for p in checkpoints[kind]]
    used = []
    real = fused_masks.FusedMaskAccumulator
    monkeypatch.setattr(fused_masks, "FusedMaskAccumulator", lambda *a: used.append(a) or real(*a))
    opts = lambda f: Options(taus=[1e-4], relative=relative, device="cpu", fused=f)  # noqa: E731
    run = lambda f: run_analysis(kind, paths, opts(f)).document  # noqa: E731
    fused_doc, n = run(True), len(used)
    torch_doc = run(False)
    assert n > 0 and len(used) == n, "the kernel ran with fused on, and only then"
    assert_close(fused_doc, torch_doc)


def assert_close(a, b, at: str = "") -> None:
    """Equal documents; floats (from sums added up in another order) to 1e-12."""
    assert type(a) is type(b), at
    if isinstance(a, dict):
        assert a.keys() == b.keys(), at
        for k in a:
            assert_close(a[k], b[k], f"{at}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), at
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{at}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=0, nan_ok=True), at
    else:
        assert a == b, at


@pytest.mark.parametrize("kind", ["series", "overlap"])
@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_checkpoints_are_refused(tmp_path, kind, fused):
    from hostile import nonfinite_target
    from safetensors.numpy import save_file

    from deltalens.worker.errors import InputError

    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "run1", "run2")]
    save_file({"w": np.ones((4, 4), np.float32)}, str(paths[0]))
    save_file({"w": np.full((4, 4), 1.5, np.float32)}, str(paths[2]))
    nonfinite_target(paths[1])
    with pytest.raises(InputError, match="holds 1 NaN and 1 infinite values"):
        run_analysis(kind, [str(p) for p in paths], Options(device="cpu", fused=fused))
