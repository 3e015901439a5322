"""Parse and validate a safetensors header before any tensor byte is touched.

Torch-free, so the API process can validate uploads with the same code the engine reads with.
Every problem raises InputError(path, one-line problem).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass

from deltalens.worker.errors import InputError

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
DEFAULT_MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_NAME_LENGTH = 1024
MAX_TENSORS = 100_000  # per file; the largest published checkpoints hold a few thousand per shard
MAX_DIMS = 64  # NumPy's limit (torch views of more dimensions cannot be made from NumPy ones either)
MAX_BYTES = (1 << 63) - 1  # a tensor's size in bytes must fit a signed 64-bit integer (NumPy, torch, DuckDB)
# Tensor names are data, but no real checkpoint needs markup, quotes, control characters or '..'
# path segments in one: such names are refused (and would be escaped / parameterised anyway).
UNSAFE_NAME = re.compile(r"[<>\"'`\\\x00-\x1f\x7f-\x9f]|(^|[/.])\.\.($|/)|^/")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(
    path: str | os.PathLike, max_header: int = DEFAULT_MAX_HEADER
) -> tuple[dict[str, TensorInfo], dict]:
    """Return ({name: TensorInfo}, metadata) for a safetensors file, or raise InputError."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(
                    path, f"not a safetensors file: {size} bytes, too short for the 8-byte header length"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > max_header:
                raise InputError(path, f"header length {header_len} exceeds the limit of {max_header} bytes")
            if 8 + header_len > size:
                raise InputError(
                    path, f"header length {header_len} goes beyond the end of the file ({size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise InputError(path, "header is not UTF-8 JSON") from None
    except RecursionError:
        raise InputError(path, "header JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError, so is our duplicate check
        msg = str(e)
        raise InputError(
            path,
            f"header JSON has a {msg}"
            if msg.startswith("duplicate")
            else f"header is not valid JSON ({msg})",
        ) from None
    if not isinstance(header, dict):
        raise InputError(path, "header JSON is not an object")
    try:  # a \ud800-style escape decodes to a lone surrogate: not Unicode, refused by the reference loader
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(path, "header JSON holds an unpaired surrogate escape (not valid Unicode)") from None
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise InputError(path, f"{len(header)} tensors exceed the limit of {MAX_TENSORS}")

    data_start = 8 + header_len
    data_len = size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()}
    _check_layout(path, tensors, data_start, data_len)
    return tensors, metadata


def check_name(path, name: str) -> str:
    """Hold a tensor name (from a header, a pickle or DCP metadata) to the name rules; the name as it
    may be shown in a message."""
    shown = name if len(name) <= 80 else name[:77] + "..."
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(path, f"tensor name longer than {MAX_NAME_LENGTH} characters: {shown!r}")
    if UNSAFE_NAME.search(name):
        raise InputError(
            path, f"tensor name {shown!r} holds markup, quotes, control characters or a '..' segment"
        )
    return shown


def _tensor_info(path: str, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    shown = check_name(path, name)
    if not isinstance(entry, dict):
        raise InputError(path, f"tensor {shown!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise InputError(path, f"tensor {shown!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InputError(path, f"tensor {shown!r}: shape must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InputError(path, f"tensor {shown!r}: {len(shape)} dimensions exceed the limit of {MAX_DIMS}")
    _check_shape_size(path, shown, shape, DTYPE_SIZES[dtype])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InputError(path, f"tensor {shown!r}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InputError(path, f"tensor {shown!r}: data_offsets [{begin}, {end}] are not ordered")
    if end > data_len:
        raise InputError(
            path,
            f"tensor {shown!r}: data_offsets [{begin}, {end}] out of bounds (data section is "
            f"{data_len} bytes; file truncated?)",
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InputError(
            path,
            f"tensor {shown!r}: shape {shape} x {dtype} needs {expected} bytes but data_offsets "
            f"span {end - begin}",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_shape_size(path: str, shown: str, shape: list[int], itemsize: int) -> None:
    """The product of the non-zero dimensions times the element size must fit in 63 bits: what NumPy
    needs to make the array even when it is empty (the safetensors library itself refuses shapes whose
    product overflows 64 bits). A zero-size tensor is fine: it is read, and skipped by the analyses."""
    size = itemsize
    for d in shape:
        size *= d or 1
        if size > MAX_BYTES:
            text = str(shape) if len(str(shape)) <= 120 else str(shape)[:117] + "..."
            raise InputError(
                path,
                f"tensor {shown!r}: shape {text} is too large: its size overflows 64 bits "
                f"(the product of its dimensions must stay below 2^63 bytes)",
            )


def _check_layout(path: str, tensors: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no hole, nothing after the last."""
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < position:
            raise InputError(path, f"tensor {info.name!r}: data_offsets overlap the previous tensor")
        if info.start > position:
            raise InputError(
                path, f"tensor {info.name!r}: {info.start - position} unindexed bytes before its data"
            )
        position = info.end
    if position != data_start + data_len:
        raise InputError(path, f"{data_start + data_len - position} trailing bytes after the last tensor")
