"""Update-mask export (worker side): which weights changed, as a safetensors file for sparse fine-tuning.

One mask per stored tensor (names as in the model): `bool` (1 byte per weight, shape kept) or
`packed` (np.packbits of the flattened mask, little bit order, U8 of ceil(n/8) bytes; the true
shape is in the header metadata). Zero-size tensors give zero-size masks, as in safetensors.

The file is written chunk by chunk under a temporary name next to `out` and published by
`os.replace`, so a reader sees the whole file or nothing; memory stays O(chunk) whatever the model
size. It runs in the worker (the `deltalens.export_mask` task): reading a pickled `.bin` checkpoint
needs torch, and the API never imports torch. Every problem with the inputs raises InputError with
one readable line.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from deltalens.worker.checkpoint import Checkpoint, open_checkpoint
from deltalens.worker.errors import InputError
from deltalens.worker.fused import widen

CHUNK_ELEMENTS = 1 << 22
NUMERIC = ("BF16", "F16", "F32", "F64")
MAX_DIMS = 32  # NumPy's limit on older versions; no real weight tensor comes close
MAX_ELEMENTS = 1 << 62


def _mask_chunks(base: np.ndarray, target: np.ndarray, tau: float, relative: bool) -> Iterator[np.ndarray]:
    flat_b, flat_t = base.reshape(-1), target.reshape(-1)
    for start in range(0, flat_b.size, CHUNK_ELEMENTS):
        b, t = widen(flat_b[start : start + CHUNK_ELEMENTS]), widen(flat_t[start : start + CHUNK_ELEMENTS])
        delta = np.abs(t - b)
        yield delta > (tau * np.abs(b) if relative else tau)


def _check_shape(path: Path, name: str, shape: tuple[int, ...]) -> None:
    """A shape NumPy can hold (a header may declare [2**64, 0]: zero bytes, yet no array has it)."""
    if (
        len(shape) > MAX_DIMS
        or any(not 0 <= d < MAX_ELEMENTS for d in shape)
        or math.prod(shape) >= MAX_ELEMENTS
    ):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InputError(path, f"tensor {shown!r}: shape {list(shape)[:8]} is too large to read as an array")


def _names(base: Checkpoint, target: Checkpoint) -> list[str]:
    names = [
        n
        for n in base.names()
        if n in target.files
        and base.meta(n).shape == target.meta(n).shape
        and base.meta(n).dtype in NUMERIC
        and target.meta(n).dtype == base.meta(n).dtype
    ]
    if not names:
        raise InputError(
            target.path, "the checkpoints share no floating-point tensor of the same shape: no mask to export"
        )
    for n in names:
        _check_shape(base.path, n, base.meta(n).shape)
    return names


def _prefix(
    base: Checkpoint, names: list[str], tau: float, relative: bool, packed: bool
) -> tuple[bytes, int]:
    """The safetensors header (length + JSON, 8-byte aligned) and the data section's size."""
    header, offset, shapes = {}, 0, {}
    for n in names:
        shape = base.meta(n).shape
        numel = math.prod(shape)
        size = (numel + 7) // 8 if packed else numel
        header[n] = {
            "dtype": "U8" if packed else "BOOL",
            "shape": [size] if packed else list(shape),
            "data_offsets": [offset, offset + size],
        }
        shapes[n] = list(shape)
        offset += size
    header["__metadata__"] = {
        "format": "deltalens-mask",
        "tau": repr(tau),
        "relative": str(relative).lower(),
        "packing": "packbits-little" if packed else "none",
        "shapes": json.dumps(shapes),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    return struct.pack("<Q", len(raw)) + raw, offset


def _tensor_bytes(
    base: Checkpoint, target: Checkpoint, name: str, tau: float, relative: bool, packed: bool
) -> Iterator[bytes]:
    try:
        b, t = base.array(name), target.array(name)
    except InputError:
        raise
    except (ValueError, OverflowError, MemoryError, OSError, TypeError) as e:  # a header that lies
        raise InputError(
            target.path, f"tensor {name[:80]!r} cannot be read ({type(e).__name__} while mapping it)"
        ) from None
    carry = np.zeros(0, dtype=bool)  # packbits works on whole bytes: carry the leftover bits
    for mask in _mask_chunks(b, t, tau, relative):
        if not packed:
            yield mask.tobytes()
            continue
        bits = np.concatenate([carry, mask])
        whole = bits.size - bits.size % 8
        yield np.packbits(bits[:whole], bitorder="little").tobytes()
        carry = bits[whole:]
    if packed and carry.size:
        yield np.packbits(carry, bitorder="little").tobytes()
    base.release(name)
    target.release(name)


def write_mask(
    base_path: str,
    target_path: str,
    tau: float,
    relative: bool,
    packed: bool,
    out: Path,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the mask file to `out` (atomically); its size in bytes. `progress(done, total)` after each
    tensor."""
    base, target = open_checkpoint(base_path), open_checkpoint(target_path)
    names = _names(base, target)
    prefix, data_size = _prefix(base, names, tau, relative, packed)
    total = len(prefix) + data_size
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for k, n in enumerate(names):
                for chunk in _tensor_bytes(base, target, n, tau, relative, packed):
                    f.write(chunk)
                if progress:
                    progress(k + 1, len(names))
            written = f.tell()
            if written != total:  # the header promised another size: never publish a lying file
                raise InputError(target.path, f"mask came out as {written} bytes, expected {total}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return total


# --- where a mask job's files live (the API and the workers agree through these) -----------------
class MaskFiles:
    """`masks/<analysis>/`: `<mask>.json` the request (API), `<mask>.safetensors` the published file
    and `<mask>.error.json` a failure (worker)."""

    def __init__(self, folder: Path, mask_id: str):
        self.folder = folder
        self.request = folder / f"{mask_id}.json"
        self.file = folder / f"{mask_id}.safetensors"
        self.error = folder / f"{mask_id}.error.json"


def write_json(path: Path, value: dict) -> None:
    """Whole or not at all (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
