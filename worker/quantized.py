"""fp8 checkpoints as virtual checkpoints of their real values, one tensor at a time.

An fp8 weight (safetensors F8_E4M3 / F8_E5M2) is stored as codes plus a scale tensor; its real value
is code × scale. Comparing the codes themselves makes a re-scaled but equal model look changed, and
analysing the scales as weights counts them twice. `dequantize(checkpoint)` (called at the end of
`checkpoint.open_checkpoint`) therefore:

* reads every fp8 weight as float64 code × scale — exact: a 4-bit (E4M3) or 3-bit (E5M2) significand
  times a float32 / bfloat16 / float16 scale fits the 53 bits of float64 — presented as Meta dtype
  "F64" with `stored` = the fp8 dtype, so the engine (the fused C kernel included) compares values
  and the rows still say what the file stores;
* finds the scale of `<name>` as `<name>_scale_inv` (DeepSeek-V3), `<name>_scale`
  (compressed-tensors, FBGEMM, ModelOpt: `<module>.weight_scale`) or `<module>.scale`; its shape is
  a scalar or [1] (per tensor), [m] or [m, 1] (per output channel) or a 2-D block grid
  [ceil(m/bm), ceil(n/bn)] (the block from `quantization_config.weight_block_size`, else the
  smallest block that fits every grid of the checkpoint), with the weight's leading
  dimensions (3-D experts) in front; a scale that fits none of these is an InputError naming it;
* removes the scales and the activation scales (`input_scale`, `k_scale`, ...) from the tensor list
  and names them in the checkpoint's `notes`.

An fp8 tensor without a scale reads as its fp8 value. Within `with fp8_mode("raw")` (`--fp8 raw`)
fp8 weights read as their fp8 values without the scales. Opening reads headers only: no tensor data
and no torch (the API opens checkpoints too); torch converts fp8 codes when a tensor is read.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from deltalens.worker import checkpoint as ck
from deltalens.worker.errors import InputError

FP8 = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16")  # ≤ 24-bit significands: code × scale is exact in float64
MODES = ("dequantized", "raw")
# where the scale of weight `<module>.<leaf>` is stored, tried in this order
SCALE_NAMES = ("{name}_scale_inv", "{name}_scale", "{module}.scale")
# last name parts that are quantization scales, not weights (in a checkpoint that holds fp8)
SCALE_LEAVES = frozenset(
    {"weight_scale", "weight_scale_inv", "input_scale", "input_scale_inv", "activation_scale"}
    | {"k_scale", "v_scale", "q_scale", "output_scale"}
)
_CHUNK = 1 << 20  # float64 elements of scale expanded at once
_MODE: ContextVar[str] = ContextVar("deltalens_fp8", default="dequantized")


@contextlib.contextmanager
def fp8_mode(mode: str | None) -> Iterator[None]:
    """Within this block fp8 weights are read `dequantized` (code × scale, the default) or `raw` (the
    fp8 value of the code, scales left out; `--fp8 raw`). Scales are never analysed as weights."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"fp8 mode one of {MODES}, not {mode!r}")
    token = _MODE.set(mode or "dequantized")
    try:
        yield
    finally:
        _MODE.reset(token)


@dataclass(frozen=True)
class Scaling:
    """How one fp8 weight's scale covers it: a grid of `grid` entries, each over `block` elements of
    the last two dimensions (leading dimensions one to one)."""

    scale: str  # the scale tensor's name
    grid: tuple[int, ...]  # the scale's shape, as many dimensions as the weight
    block: tuple[int, int]  # rows × columns of the weight one scale entry covers
    layout: str  # "per tensor", "per channel", "block 128×128"


class Fp8Weight:
    """One fp8 tensor read as float64: code × scale (`scaling` None or raw mode: the code's value)."""

    def __init__(self, checkpoint: ck.Checkpoint, name: str, scaling: Scaling | None, raw: bool):
        self.codes, self.name = checkpoint.files[name], name
        self.scaling = None if raw else scaling
        self.scales = checkpoint.files[scaling.scale] if self.scaling else None

    def meta(self, name: str) -> ck.Meta:
        m = self.codes.meta(self.name)
        return ck.Meta(
            m.shape, "F64", m.nbytes, stored=m.dtype
        )  # nbytes as stored: progress counts file bytes

    def array(self, name: str) -> np.ndarray:
        from deltalens.worker.adapters import as_float64

        values = as_float64(self.codes.array(self.name), self.codes.meta(self.name).dtype)
        s = self.scaling
        if s is None:
            return values
        scale = as_float64(self.scales.array(s.scale), self.scales.meta(s.scale).dtype).reshape(s.grid)
        if scale.size == 1:
            values *= scale.item()
            return values
        (bm, bn), (m, n) = s.block, values.shape[-2:]
        step = max(1, _CHUNK // max(1, n * math.prod(values.shape[:-2]) * bm)) * bm
        for row in range(0, m, step):  # rows of whole blocks: each chunk of scale expanded once
            stop = min(m, row + step)
            part = scale[..., row // bm : -(-stop // bm), :]
            values[..., row:stop, :] *= np.repeat(np.repeat(part, bm, axis=-2), bn, axis=-1)[
                ..., : stop - row, :n
            ]
        return values

    def tensor(self, name: str):
        import torch

        return torch.from_numpy(self.array(name))

    def release(self, name: str) -> None:
        self.codes.release(self.name)
        if self.scaling:
            self.scales.release(self.scaling.scale)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _config_block(checkpoint: ck.Checkpoint) -> tuple[int, int] | None:
    """`quantization_config.weight_block_size` of config.json, when given."""
    quant = checkpoint.config.get("quantization_config")
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return None
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise InputError(
            checkpoint.path / "config.json",
            f"quantization_config.weight_block_size must be two positive integers, got {block!r}",
        )
    return block[0], block[1]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _layout(shape: tuple[int, ...], grid: tuple[int, ...]) -> str | None:
    """The convention a scale of shape `grid` follows for a weight of `shape`: "per tensor",
    "per channel", "block" (a grid over the last two dimensions), or None (none of them)."""
    lead = shape[:-2]
    if math.prod(grid) == 1:
        return "per tensor"
    if len(shape) < 2:
        return None
    if grid in ((*lead, shape[-2]), (*lead, shape[-2], 1)):
        return "per channel"
    if len(grid) == len(shape) and grid[:-2] == lead and 0 not in grid:
        return "block"
    return None


def _inferred_block(grids: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, int] | None:
    """The block of a checkpoint whose config.json names none, from its (weight shape, scale grid)
    pairs. Per axis, a block b fits a grid of g entries over d elements when ceil(d / b) = g; the
    smallest b that fits every grid is taken — the true block whenever one dimension is a multiple
    of it. When no b fits them all, the one most grids point to (ceil(d / g)), so that the grid
    that does not fit it is the one named as wrong."""
    if not grids:
        return None

    def axis(k: int) -> int:
        fits = [(_ceil(s[k], g[k]), _ceil(s[k], g[k] - 1) - 1 if g[k] > 1 else math.inf) for s, g in grids]
        low, high = max(lo for lo, _ in fits), min(hi for _, hi in fits)
        if low <= high:
            return low
        votes = Counter(_ceil(s[k], g[k]) for s, g in grids if g[k] > 1)
        return max(votes.items(), key=lambda kv: (kv[1], kv[0]))[0]

    return axis(-2), axis(-1)


def _scaling(
    checkpoint: ck.Checkpoint, name: str, scale: str, block: tuple[int, int] | None, source: str
) -> Scaling:
    """How `scale` covers weight `name`, or InputError naming both when its dtype or shape fits no
    convention. `block`: the checkpoint's block size; `source`: where it comes from, as messages say
    it ("" when inferred from the grids)."""
    shape, meta = checkpoint.meta(name).shape, checkpoint.meta(scale)
    grid, layout = meta.shape, _layout(checkpoint.meta(name).shape, meta.shape)
    if meta.dtype not in SCALE_DTYPES:
        problem = f"is {meta.dtype}; a scale must be one of {', '.join(SCALE_DTYPES)}"
    elif layout == "per tensor":
        return Scaling(scale, (1,) * len(shape), (1, 1), layout)
    elif layout == "per channel":
        return Scaling(scale, (*shape[:-1], 1), (1, shape[-1]), layout)
    elif layout is None:
        problem = "fits no scale layout (per tensor, per output channel, block grid)"
    else:
        (m, n), (bm, bn) = shape[-2:], block
        expected = (*shape[:-2], _ceil(m, bm), _ceil(n, bn))
        if expected == grid:
            return Scaling(scale, grid, (bm, bn), f"block {bm}×{bn}" + ("" if source else " inferred"))
        problem = f"is not the grid of blocks {bm}×{bn}{source or ' (inferred)'} (expected {list(expected)})"
    where = getattr(checkpoint.files[scale], "path", checkpoint.path)
    raise InputError(where, f"scale {scale!r} {list(grid)} of fp8 weight {name!r} {list(shape)} {problem}")


def _scale_of(checkpoint: ck.Checkpoint, name: str) -> str | None:
    module = name.rsplit(".", 1)[0] if "." in name else ""
    found = [s for t in SCALE_NAMES if (s := t.format(name=name, module=module)) in checkpoint.files]
    if len(found) > 1:
        raise InputError(
            checkpoint.path, f"fp8 weight {name!r} has two scales: {found[0]!r} and {found[1]!r}"
        )
    return found[0] if found else None


def _note(checkpoint: ck.Checkpoint, plans: dict[str, Scaling | None], dropped: list[str], raw: bool) -> str:
    dtypes = ", ".join(sorted({checkpoint.meta(n).dtype for n in plans}))
    scaled = [p for p in plans.values() if p]
    parts = []
    if scaled:
        how = "; ".join(sorted({f"{p.layout}, {_leaf(p.scale)}" for p in scaled}))
        parts.append(
            f"{len(scaled)} fp8 weights ({dtypes}) "
            + (
                f"compared as their stored fp8 values without their scales (--fp8 raw; {how})"
                if raw
                else f"dequantized as code × scale ({how})"
            )
        )
    if len(scaled) < len(plans):
        parts.append(f"{len(plans) - len(scaled)} fp8 tensors without a scale read as their fp8 values")
    if dropped:
        kinds = Counter(_leaf(n) for n in dropped)
        named = ", ".join(f"{count} {leaf}" for leaf, count in sorted(kinds.items()))
        parts.append(f"{len(dropped)} scale tensors not analysed ({named})")
    return f"{checkpoint.path}: " + "; ".join(parts)


def dequantize(checkpoint: ck.Checkpoint) -> ck.Checkpoint:
    """The checkpoint with its fp8 tensors read as real values and its scales left out (see the
    module docstring); a checkpoint without fp8 tensors comes back as it is. Headers only."""
    names = checkpoint.names()
    if not any(checkpoint.meta(n).dtype in FP8 for n in names):
        return checkpoint
    scale_of = {
        n: _scale_of(checkpoint, n)
        for n in names
        if checkpoint.meta(n).dtype in FP8 and _leaf(n) not in SCALE_LEAVES
    }
    block, source = _config_block(checkpoint), " (weight_block_size in config.json)"
    if block is None:
        shapes = [(checkpoint.meta(n).shape, checkpoint.meta(s).shape) for n, s in scale_of.items() if s]
        block, source = _inferred_block([(w, g) for w, g in shapes if _layout(w, g) == "block"]), ""
    plans = {n: s and _scaling(checkpoint, n, s, block, source) for n, s in scale_of.items()}
    scales = {p.scale for p in plans.values() if p}
    dropped = [n for n in names if n in scales or _leaf(n) in SCALE_LEAVES]
    raw, left_out = _MODE.get() == "raw", set(dropped)
    files = {n: r for n, r in checkpoint.files.items() if n not in left_out}
    files.update({n: Fp8Weight(checkpoint, n, p, raw) for n, p in plans.items()})
    checkpoint.notes.append(_note(checkpoint, plans, dropped, raw))
    checkpoint.files = files
    return checkpoint
