"""Update-mask export: which weights changed, as a safetensors file for sparse fine-tuning.

One mask per stored tensor (names as in the model): `bool` (1 byte per weight, shape kept) or
`packed` (np.packbits of the flattened mask, little bit order, U8 of ceil(n/8) bytes; the true
shape is in the header metadata). Streamed tensor by tensor and chunk by chunk: memory stays
O(chunk), whatever the model size. NumPy only — the API never imports torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator

import numpy as np

from deltalens.backend.errors import ApiError
from deltalens.worker.checkpoint import Checkpoint, open_checkpoint
from deltalens.worker.fused import widen

CHUNK_ELEMENTS = 1 << 22
NUMERIC = ("BF16", "F16", "F32", "F64")


def _mask_chunks(base: np.ndarray, target: np.ndarray, tau: float, relative: bool) -> Iterator[np.ndarray]:
    flat_b, flat_t = base.reshape(-1), target.reshape(-1)
    for start in range(0, flat_b.size, CHUNK_ELEMENTS):
        b, t = widen(flat_b[start : start + CHUNK_ELEMENTS]), widen(flat_t[start : start + CHUNK_ELEMENTS])
        delta = np.abs(t - b)
        yield delta > (tau * np.abs(b) if relative else tau)


def mask_file(
    base_path: str, target_path: str, tau: float, relative: bool, packed: bool
) -> tuple[int, Iterator[bytes]]:
    """(size in bytes, byte chunks) of the safetensors mask file."""
    base, target = open_checkpoint(base_path), open_checkpoint(target_path)
    names = [
        n
        for n in base.names()
        if n in target.files
        and base.meta(n).shape == target.meta(n).shape
        and base.meta(n).dtype in NUMERIC
        and target.meta(n).dtype == base.meta(n).dtype
    ]
    if not names:
        raise ApiError(
            409, "nothing_to_export", "the checkpoints share no floating-point tensor of the same shape"
        )
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
    prefix = struct.pack("<Q", len(raw)) + raw
    return len(prefix) + offset, _stream(prefix, base, target, names, tau, relative, packed)


def _stream(
    prefix: bytes,
    base: Checkpoint,
    target: Checkpoint,
    names: list[str],
    tau: float,
    relative: bool,
    packed: bool,
) -> Iterator[bytes]:
    yield prefix
    for n in names:
        carry = np.zeros(0, dtype=bool)  # packbits works on whole bytes: carry the leftover bits
        for mask in _mask_chunks(base.array(n), target.array(n), tau, relative):
            if not packed:
                yield mask.tobytes()
                continue
            bits = np.concatenate([carry, mask])
            whole = bits.size - bits.size % 8
            yield np.packbits(bits[:whole], bitorder="little").tobytes()
            carry = bits[whole:]
        if packed and carry.size:
            yield np.packbits(carry, bitorder="little").tobytes()
        base.release(n)
        target.release(n)
