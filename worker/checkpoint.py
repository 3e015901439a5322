"""Lazy, memory-mapped checkpoint readers.

`open_checkpoint(path)` accepts an HF directory (single or sharded safetensors, or a pickled
`pytorch_model.bin`), a lone `.safetensors` file, or a `.bin`/`.pt` state dict. Tensors come
back as zero-copy views of the mapped file — NumPy arrays (`array`, bfloat16 as raw uint16) or
torch tensors (`tensor`); `release(name)` hands the pages back so resident memory stays
O(one tensor), not O(model). torch is imported only when a torch tensor is asked for.

Inside `with confined(roots, pins)` (the service: the API while it validates, the worker while it
runs) every file the reader opens — weights, index, shards, config.json — must resolve inside one
of `roots` once opened (a symlink out is refused with `Unconfined`), and a checkpoint whose path
has a pin (recorded at registration by `pin_checkpoint`) must still hold exactly the pinned files
with the pinned size and mtime, or opening it raises `CheckpointChanged`. The CLI opens anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import pickle
import re
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltalens.worker.errors import InputError
from deltalens.worker.safetensors_header import (
    DTYPE_SIZES,
    MAX_BYTES,
    MAX_DIMS,
    MAX_TENSORS,
    TensorInfo,
    check_name,
    read_header,
)

# safetensors dtype -> NumPy storage (bfloat16 and float8 kept as raw bits)
NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "F16": np.float16,
    "BF16": np.uint16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
RAW_BITS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # torch dtype names


def torch_dtype_name(dtype: str) -> str:
    return (
        RAW_BITS.get(dtype)
        or {
            "BOOL": "bool",
            "U8": "uint8",
            "I8": "int8",
            "I16": "int16",
            "I32": "int32",
            "I64": "int64",
            "U16": "uint16",
            "U32": "uint32",
            "U64": "uint64",
            "F16": "float16",
            "F32": "float32",
            "F64": "float64",
        }[dtype]
    )


def to_torch(array: np.ndarray, dtype: str):
    """Zero-copy torch view of a NumPy array read from a file (raw bits reinterpreted)."""
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, RAW_BITS[dtype])) if dtype in RAW_BITS else tensor


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_madvise = getattr(ctypes.CDLL(None, use_errno=True), "madvise", None) if os.name == "posix" else None
if _madvise is not None:
    _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int


def madvise(mapped: mmap.mmap, advice: int, start: int, length: int) -> None:
    """mapped.madvise, without holding the GIL: mmap.madvise keeps it for the whole call, so
    populating (or dropping) a large tensor's pages on the prefetch thread stalled every other
    Python thread, the one feeding the kernel threads included. ctypes calls drop the GIL."""
    if _madvise is None:
        return mapped.madvise(advice, start, length)
    base = np.frombuffer(mapped, np.uint8, count=1).ctypes.data  # page-aligned, as is start
    if _madvise(base + start, length, advice):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


# --- confinement and pins ----------------------------------------------------------------------
class Unconfined(InputError):
    """A file the reader would open resolves outside the allowed roots (a symlink out)."""

    code = "path_not_allowed"


class CheckpointChanged(InputError):
    """A registered checkpoint's files are not the ones that were validated and pinned."""

    code = "checkpoint_changed"


@dataclass(frozen=True)
class _Confinement:
    roots: tuple[Path, ...]
    pins: dict[str, dict]  # normalised checkpoint path -> pin_checkpoint()'s record


_CONFINEMENT: ContextVar[_Confinement | None] = ContextVar("deltalens_confinement", default=None)


def _key(path: str | os.PathLike) -> str:
    return os.path.normpath(os.fspath(path))


@contextlib.contextmanager
def confined(
    roots: Iterable[str | os.PathLike], pins: dict[str, dict | None] | None = None
) -> Iterator[None]:
    """Within this block every file opened by this module must resolve inside `roots`, and a
    checkpoint path with a pin must match it (see the module docstring)."""
    resolved = tuple(Path(os.path.realpath(r)) for r in roots)
    kept = {_key(p): pin for p, pin in (pins or {}).items() if pin}
    token = _CONFINEMENT.set(_Confinement(resolved, kept))
    try:
        yield
    finally:
        _CONFINEMENT.reset(token)


def _open_fd(path: Path, opened: dict[Path, os.stat_result] | None) -> int:
    """Open one file for reading, refuse it when it resolves outside the confinement, and record its
    stat (of this very descriptor) in `opened`. The caller closes the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(path, "not a regular file")
        conf = _CONFINEMENT.get()
        if conf is not None:
            try:  # where the descriptor really points: no window for a symlink swap after the check
                real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                real = Path(os.path.realpath(path))
            if not any(real == root or root in real.parents for root in conf.roots):
                raise Unconfined(
                    path,
                    "resolves outside the allowed roots (DELTALENS_ALLOWED_ROOTS) and the data folder; "
                    "a symlink may not point out of them",
                )
        if opened is not None:
            opened[Path(path)] = st
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fd_path(fd: int, path: Path) -> str:
    """A name that opens this same descriptor's file again (Linux), else the path itself."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else os.fspath(path)


MAX_JSON_BYTES = 64 << 20  # config.json / index: the largest published indexes are ~10 MB


def _read_text(path: Path, opened: dict[Path, os.stat_result] | None) -> str:
    fd = _open_fd(path, opened)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise InputError(path, f"{size} bytes of JSON metadata; more than {MAX_JSON_BYTES} are not read")
        data = f.read(MAX_JSON_BYTES + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason})") from None


def _pin_record(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _pin_name(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _verify_pin(path: Path, opened: dict[Path, os.stat_result]) -> None:
    conf = _CONFINEMENT.get()
    pin = conf.pins.get(_key(path)) if conf is not None else None
    if not pin:
        return
    base = path if path.is_dir() else path.parent
    now = {_pin_name(p, base): _pin_record(st) for p, st in opened.items()}
    pinned = pin.get("files", {})
    problems = [
        f"{name} size/mtime differ" for name in sorted(set(now) & set(pinned)) if now[name] != pinned[name]
    ]
    problems += [f"{name} is new" for name in sorted(set(now) - set(pinned))]
    problems += [f"{name} is no longer read" for name in sorted(set(pinned) - set(now))]
    if problems:
        raise CheckpointChanged(
            path,
            "changed since it was registered: " + "; ".join(problems[:5]) + (" ..." if problems[5:] else ""),
        )


def pin_checkpoint(path: str | os.PathLike) -> dict:
    """Size and mtime of every file the reader opens for `path` (confinement applies), without
    reading tensors or unpickling anything: {"files": {relative name: {"size", "mtime_ns"}}}."""
    path = Path(path)
    opened: dict[Path, os.stat_result] = {}
    for file in checkpoint_files(path):
        os.close(_open_fd(file, opened))
    base = path if path.is_dir() else path.parent
    return {"files": {_pin_name(p, base): _pin_record(st) for p, st in opened.items()}}


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: BF16, F32, ...
    nbytes: int
    stored: str | None = None  # what the file stores when `dtype` is a view of it (fp8 read as F64)


class SafetensorsFile:
    """One .safetensors file, validated, mapped once, read tensor by tensor."""

    def __init__(
        self, path: Path, opened: dict[Path, os.stat_result] | None = None, max_header: int | None = None
    ):
        self.path = path
        seen: dict[Path, os.stat_result] = {}
        fd = _open_fd(path, seen)
        try:
            limit = {} if max_header is None else {"max_header": max_header}
            self.infos: dict[str, TensorInfo] = read_header(_fd_path(fd, path), **limit)[0]
        except InputError as e:
            raise InputError(path, e.problem) from None
        finally:
            os.close(fd)
        self._stat = seen[Path(path)]
        if opened is not None:
            opened.update(seen)
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            fd = _open_fd(self.path, None)
            try:
                st, was = os.fstat(fd), self._stat
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
                    was.st_dev,
                    was.st_ino,
                    was.st_size,
                    was.st_mtime_ns,
                ):
                    raise CheckpointChanged(
                        self.path,
                        "changed while being read (replaced or rewritten after its header was checked)",
                    )
                # ACCESS_COPY: writable (never written) arrays, which torch.from_numpy accepts silently.
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if st.st_size else None
            finally:
                os.close(fd)
        return self._map

    def meta(self, name: str) -> Meta:
        i = self.infos[name]
        return Meta(i.shape, i.dtype, i.nbytes)

    def array(self, name: str) -> np.ndarray:
        i = self.infos[name]
        dtype = NUMPY_DTYPES[i.dtype]
        if i.numel == 0:
            return np.empty(i.shape, dtype=dtype)
        mapped = self._mapped()
        start = i.start - i.start % mmap.PAGESIZE
        try:  # fault the tensor's pages in with one call instead of one fault per 4 KiB page
            madvise(mapped, MADV_POPULATE_READ, start, i.end - start)
        except OSError:
            pass  # kernels before Linux 5.14: pages fault in as they are read
        return np.frombuffer(mapped, dtype=dtype, count=i.numel, offset=i.start).reshape(i.shape)

    def tensor(self, name: str):
        return to_torch(self.array(name), self.infos[name].dtype)

    def release(self, name: str) -> None:
        i = self.infos[name]
        if self._map is not None and i.nbytes:
            start = i.start - i.start % mmap.PAGESIZE
            madvise(self._map, mmap.MADV_DONTNEED, start, i.end - start)


# trainer checkpoints: the keys a model's state dict is saved under next to optimizer state & co.
NEST_KEYS = ("model", "module", "state_dict", "model_state_dict")


def _listed(keys: Iterable[object], limit: int = 8) -> str:
    shown = sorted(str(k)[:60] for k in keys)
    return ", ".join(shown[:limit]) + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


def _unwrap_trainer_state(obj: object, path: Path, notes: list[str]) -> dict:
    """The state dict in a torch.load'ed object: the object itself, or the one entry of a trainer
    checkpoint (`{"model": sd, "optimizer": ..., "step": ...}`, DeepSpeed's `{"module": sd}`) under
    one of NEST_KEYS; what else it holds is ignored and named in `notes`. A DDP state dict whose
    names all start with `module.` loses that prefix (noted too)."""
    import torch

    def is_state_dict(d: object) -> bool:
        return isinstance(d, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
        )

    if isinstance(obj, dict) and not is_state_dict(obj):
        found = [k for k in NEST_KEYS if isinstance(obj.get(k), dict) and obj[k] and is_state_dict(obj[k])]
        if len(found) > 1:
            raise InputError(
                path,
                f"holds state dicts under both {found[0]!r} and {found[1]!r}: cannot tell which is the model",
            )
        if found:
            others = [k for k in obj if k != found[0]]
            notes.append(
                f"{path.name}: weights read from its {found[0]!r} entry"
                + (f"; ignored: {_listed(others)}" if others else "")
            )
            obj = obj[found[0]]
        elif isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # as before: let the check below name what is wrong with it
    if not is_state_dict(obj):
        raise InputError(path, "not a state dict (expected a mapping of names to tensors)")
    if obj and all(k.startswith("module.") and len(k) > 7 for k in obj):
        stripped = {k[7:]: v for k, v in obj.items()}
        if len(stripped) == len(obj):
            notes.append(f"{path.name}: the DDP prefix 'module.' was removed from every tensor name")
            obj = stripped
    return obj


class PickledStateDict:
    """A torch.save'd state dict, read only through torch.load(weights_only=True)."""

    def __init__(self, path: Path, opened: dict[Path, os.stat_result] | None = None):
        import torch

        self.path = path
        fd = _open_fd(path, opened)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = self._load(_fd_path(fd, path))
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():  # e.g. "invalid load key": not a pickle at all
                raise InputError(path, "cannot read as a torch state dict: not a torch.save file") from None
            culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
            opcode = re.search(r"Unsupported operand (\d+)", str(e))
            what = (
                f"it calls {culprit.group(1)}"
                if culprit
                else f"not a torch.save state dict (pickle opcode {opcode.group(1)} is not read)"
                if opcode
                else "it holds more than tensors"
            )
            raise InputError(
                path, f"refused to unpickle: {what}; only plain state dicts of tensors are read"
            ) from None
        except Exception as e:  # torch's own errors on bytes that are no state dict: one readable line
            first = str(e).splitlines()[0].split(". ")[0][:200] if str(e).strip() else ""
            if isinstance(e, OSError):  # the file opened fine: torch's zip reader gave up on its bytes
                first = f"not a readable torch.save file ({e.strerror or type(e).__name__})"
            elif not (isinstance(e, (RuntimeError, EOFError, ValueError)) and first):
                first = f"not a torch.save file ({type(e).__name__})"
            raise InputError(path, f"cannot read as a torch state dict: {first}") from None
        finally:
            os.close(fd)
        self.notes: list[str] = []
        obj = _unwrap_trainer_state(obj, path, self.notes)
        names = {getattr(torch, torch_dtype_name(k)): k for k in NUMPY_DTYPES}
        for name, t in obj.items():  # the rules a safetensors header is held to
            shown = check_name(path, name)
            if t.layout != torch.strided or t.is_quantized:
                raise InputError(path, f"tensor {shown!r}: only dense tensors are read ({t.layout})")
            if t.dtype not in names:
                raise InputError(path, f"tensor {shown!r}: unsupported dtype {t.dtype}")
        self.tensors = obj
        self.infos = obj
        self.dtypes = {name: names[t.dtype] for name, t in obj.items()}

    @staticmethod
    def _load(path: str):
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format

    def meta(self, name: str) -> Meta:
        t = self.tensors[name]
        return Meta(tuple(t.shape), self.dtypes[name], t.numel() * t.element_size())

    def tensor(self, name: str):
        return self.tensors[name]

    def array(self, name: str) -> np.ndarray:
        t, dtype = self.tensors[name], self.dtypes[name]
        if dtype in RAW_BITS:  # NumPy has no bfloat16 / float8: hand out the raw bits
            import torch

            t = t.view(torch.uint16 if dtype == "BF16" else torch.uint8)
        return t.numpy()

    def release(self, name: str) -> None:
        pass


# --- torch.distributed.checkpoint directories --------------------------------------------------
DCP_METADATA = ".metadata"
DCP_SUFFIX = ".distcp"
# what a DCP .metadata pickle may name: the metadata dataclasses, torch.Size, dtypes and layouts
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def is_dcp(folder: Path) -> bool:
    """A torch.distributed.checkpoint directory: a `.metadata` file and `*.distcp` files."""
    return (folder / DCP_METADATA).is_file() and any(folder.glob("*" + DCP_SUFFIX))


def is_pickled(path: Path) -> bool:
    """Files only torch can read (the API checks them in a child process): .bin/.pt/.pth state dicts
    and the two kinds of file of a torch.distributed.checkpoint directory."""
    return path.suffix in PICKLE_SUFFIXES or path.suffix == DCP_SUFFIX or path.name == DCP_METADATA


def _load_dcp_metadata(data: bytes, path: Path):
    """Unpickle a DCP `.metadata` file with an allow-list of globals (the metadata dataclasses,
    torch.Size, dtypes): nothing else can be named, so no code runs. torch's weights_only unpickler
    does not take the protocol-4 pickles DCP writes."""
    import io

    import torch

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
                return getattr(torch, name)
            if (module, name) not in _DCP_GLOBALS:
                raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
            import importlib

            return getattr(importlib.import_module(module), name)

    try:
        return Restricted(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it calls {culprit.group(1)}" if culprit else "not a pickle"
        raise InputError(path, f"refused to unpickle DCP metadata: {what}") from None
    except Exception as e:  # truncated or foreign bytes
        raise InputError(path, f"not readable DCP metadata ({type(e).__name__})") from None


MAX_DCP_CHUNKS = 4096  # shards of one tensor (one per rank that held a piece of it)


def _overlapping(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether two of these (offsets, sizes) boxes share an element (empty boxes share none)."""
    boxes = [b for b in boxes if all(b[1])]
    for i, (o1, n1) in enumerate(boxes):
        for o2, n2 in boxes[i + 1 :]:
            if all(a < c + m and c < a + n for a, n, c, m in zip(o1, n1, o2, n2)):
                return True
    return False


class DcpDirectory:
    """A `torch.distributed.checkpoint` directory (`.metadata` + `__<rank>_<n>.distcp`), read one
    tensor at a time: `torch.distributed.checkpoint.load` into one preallocated tensor per name, so
    memory stays O(largest tensor). The metadata is validated first (names, dtypes, shapes, chunk
    bounds, storage files inside the folder and the byte ranges inside them); every file the loader
    opens goes through the confinement layer and must be the very file stat'ed when it was opened.
    Trainer states saved as `{"model": sd, "optimizer": ...}` (flattened by DCP to `model.<name>`)
    yield the model's tensors under their own names; the rest is named in `notes`."""

    def __init__(self, folder: Path, opened: dict[Path, os.stat_result] | None = None):
        import torch
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            Metadata,
            MetadataIndex,
            TensorStorageMetadata,
        )

        self.path = folder
        meta_path = folder / DCP_METADATA
        fd = _open_fd(meta_path, opened)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size > MAX_JSON_BYTES:
                raise InputError(
                    meta_path, f"{size} bytes of DCP metadata; more than {MAX_JSON_BYTES} are not read"
                )
            metadata = _load_dcp_metadata(f.read(MAX_JSON_BYTES + 1), meta_path)
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            raise InputError(meta_path, "not torch.distributed.checkpoint metadata")
        self._stats: dict[str, os.stat_result] = {}
        for shard in sorted(folder.glob("*" + DCP_SUFFIX)):
            seen: dict[Path, os.stat_result] = {}
            os.close(_open_fd(shard, seen))
            self._stats[shard.name] = seen[shard]
            if opened is not None:
                opened.update(seen)
        storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else None
        if storage is None or len(storage) > 16 * MAX_TENSORS:
            raise InputError(meta_path, "DCP metadata without a valid storage map")
        for index, info in storage.items():
            if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
                raise InputError(meta_path, "DCP storage map holds entries of the wrong type")
            rel = info.relative_path
            if not isinstance(rel, str) or rel not in self._stats:
                raise InputError(
                    meta_path, f"storage file {str(rel)[:80]!r} is not a .distcp file of this folder"
                )
            ok = all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length))
            if not ok or info.offset + info.length > self._stats[rel].st_size:
                raise InputError(meta_path, f"a byte range of {rel} lies outside the file")
        dtypes = {getattr(torch, torch_dtype_name(k)): k for k in NUMPY_DTYPES}
        planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        paths = {fqn: p for fqn, p in planner.items() if isinstance(p, tuple) and p}
        nested = {p[0] for p in paths.values() if len(p) > 1 and p[0] in NEST_KEYS}
        if len(nested) > 1:
            first, second = sorted(nested)[:2]
            raise InputError(
                folder,
                f"holds state dicts under both {first!r} and {second!r}: cannot tell which is the model",
            )
        top = nested.pop() if nested else None
        self.notes: list[str] = []
        self.infos: dict[str, tuple[str, Meta]] = {}
        ignored: set[str] = set()
        if len(metadata.state_dict_metadata) > MAX_TENSORS:
            raise InputError(meta_path, f"more than {MAX_TENSORS} entries")
        for fqn, item in metadata.state_dict_metadata.items():
            if not isinstance(fqn, str):
                raise InputError(meta_path, "an entry name is not a string")
            route = paths.get(fqn, (fqn,))
            if top is not None and route[0] != top:
                ignored.add(str(route[0]))
                continue
            if isinstance(item, BytesStorageMetadata):
                ignored.add(fqn)
                continue
            name = ".".join(map(str, route[1:])) if top is not None else fqn
            shown = check_name(meta_path, name)
            if not isinstance(item, TensorStorageMetadata):
                raise InputError(meta_path, f"entry {shown!r} is neither a tensor nor bytes")
            shape = item.size
            if (
                not isinstance(shape, tuple)
                or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and d >= 0 for d in shape)
            ):
                raise InputError(meta_path, f"tensor {shown!r}: invalid shape")
            dtype = dtypes.get(getattr(item.properties, "dtype", None))
            if dtype is None:
                raise InputError(meta_path, f"tensor {shown!r}: unsupported dtype")
            numel = math.prod(shape)
            nbytes = numel * DTYPE_SIZES[dtype]
            if nbytes > MAX_BYTES:
                raise InputError(meta_path, f"tensor {shown!r}: larger than 2^63 bytes")
            covered = 0
            for chunk in item.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                covered += math.prod(sizes) if all(isinstance(n, int) for n in sizes) else -1
                if (
                    len(offsets) != len(shape)
                    or len(sizes) != len(shape)
                    or any(
                        not (isinstance(o, int) and isinstance(n, int) and o >= 0 and n >= 0 and o + n <= d)
                        for o, n, d in zip(offsets, sizes, shape)
                    )
                ):
                    raise InputError(meta_path, f"tensor {shown!r}: a chunk lies outside its shape")
            boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in item.chunks]
            if covered != numel or len(boxes) > MAX_DCP_CHUNKS or _overlapping(boxes):
                raise InputError(meta_path, f"tensor {shown!r}: its chunks do not cover it exactly once")
            if name in self.infos:
                raise InputError(meta_path, f"tensor {shown!r} appears twice")
            self.infos[name] = (fqn, Meta(tuple(shape), dtype, nbytes))
        if top is not None:
            self.notes.append(
                f"{folder.name}: weights read from its {top!r} entry"
                + (f"; ignored: {_listed(ignored)}" if ignored else "")
            )
        elif ignored:
            self.notes.append(f"{folder.name}: non-tensor entries ignored: {_listed(ignored)}")
        self._metadata = metadata
        self._cached: tuple[str, object] | None = None

    def meta(self, name: str) -> Meta:
        return self.infos[name][1]

    def tensor(self, name: str):
        cached = self._cached
        if cached is not None and cached[0] == name:
            return cached[1]
        import torch
        import torch.distributed.checkpoint as dcp

        fqn, meta = self.infos[name]
        out = torch.empty(meta.shape, dtype=getattr(torch, torch_dtype_name(meta.dtype)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load({fqn: out}, storage_reader=_dcp_reader(self), no_dist=True)
        except InputError:
            raise
        except Exception as e:  # torch's own errors on damaged shards: one readable line
            raise InputError(self.path, f"cannot read tensor {name[:80]!r} ({type(e).__name__})") from None
        self._cached = (name, out)
        return out

    def array(self, name: str) -> np.ndarray:
        t, dtype = self.tensor(name), self.meta(name).dtype
        if dtype in RAW_BITS:
            import torch

            t = t.view(torch.uint16 if dtype == "BF16" else torch.uint8)
        return t.numpy()

    def release(self, name: str) -> None:
        if self._cached is not None and self._cached[0] == name:
            self._cached = None

    def _stream(self, path: Path):
        """A confined read of one of this folder's .distcp files, refused when it is not the file
        stat'ed at open."""
        fd = _open_fd(path, None)
        st, was = os.fstat(fd), self._stats.get(path.name)
        if was is None or (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
            was.st_dev,
            was.st_ino,
            was.st_size,
            was.st_mtime_ns,
        ):
            os.close(fd)
            raise CheckpointChanged(
                path, "changed while being read (replaced or rewritten after it was checked)"
            )
        return os.fdopen(fd, "rb")


def _dcp_reader(owner: DcpDirectory):
    """torch's FileSystemReader, with the metadata already validated and every open confined."""
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class ConfinedFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if mode != "rb":
                raise InputError(path, "a checkpoint is only read")
            with owner._stream(Path(path)) as stream:
                yield stream

    class Reader(FileSystemReader):
        def __init__(self):
            super().__init__(owner.path)
            self.fs = ConfinedFileSystem()

        def read_metadata(self, *args, **kwargs):
            metadata = owner._metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader()


@dataclass
class Checkpoint:
    """A model checkpoint: tensor names mapped to the file that holds them, plus config.json."""

    path: Path
    files: dict[str, SafetensorsFile | PickledStateDict] = field(default_factory=dict)  # tensor name -> file
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was read how, and what was left out

    def names(self) -> list[str]:
        return list(self.files)

    def meta(self, name: str) -> Meta:
        return self.files[name].meta(name)

    def tensor(self, name: str):
        return self.files[name].tensor(name)

    def array(self, name: str) -> np.ndarray:
        return self.files[name].array(name)

    def release(self, name: str) -> None:
        self.files[name].release(name)

    def nbytes(self) -> int:
        return sum(self.meta(n).nbytes for n in self.files)

    def nonfinite(self, name: str, chunk: int = 1 << 22) -> tuple[int, int]:
        """(NaN count, ±Inf count) of one tensor, read in chunks (the rare error path)."""
        dtype, flat = self.meta(name).dtype, self.array(name).reshape(-1)
        if dtype not in FLOAT_DTYPES:
            return 0, 0
        nan = inf = 0
        for start in range(0, flat.size, chunk):
            part = flat[start : start + chunk]
            values = to_torch(part, dtype).float().numpy() if dtype in RAW_BITS else part
            nan, inf = nan + int(np.isnan(values).sum()), inf + int(np.isinf(values).sum())
        return nan, inf


def _open_file(path: Path, opened: dict[Path, os.stat_result] | None = None, max_header: int | None = None):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, opened, max_header)
    if path.suffix in PICKLE_SUFFIXES:
        return PickledStateDict(path, opened)
    if path.name == DCP_METADATA:
        return DcpDirectory(path.parent, opened)
    raise InputError(
        path, "unsupported file type (expected .safetensors, .bin, .pt or a checkpoint directory)"
    )


def _read_config(folder: Path, opened: dict[Path, os.stat_result] | None = None) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(_read_text(config_path, opened))
    except (ValueError, RecursionError) as e:
        raise InputError(config_path, f"config.json is not valid JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def _sharded(
    folder: Path, index_path: Path, opened: dict[Path, os.stat_result] | None = None
) -> dict[str, Path]:
    try:
        index = json.loads(_read_text(index_path, opened))
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, AssertionError, TypeError, RecursionError):
        raise InputError(index_path, "index is not JSON with a 'weight_map' object") from None
    shards = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise InputError(index_path, f"weight_map entry for {name!r} is not a file name")
        norm = os.path.normpath(rel)
        if os.path.isabs(norm) or norm in (".", "..") or norm.startswith(".." + os.sep):
            raise InputError(index_path, f"shard path {rel!r} leaves the checkpoint folder")
        # where a shard (a symlink, say) really points is checked when it is opened (confinement)
        target = folder / norm
        if not target.is_file():
            raise InputError(index_path, f"shard {rel!r} is missing")
        shards[name] = target
    return shards


INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PREFER_CHOICES = ("safetensors", "bin", "dcp", "module", "fp32")
PREFER_SETS = {"module": "deepspeed", "fp32": "deepspeed"}  # DeepSpeed: module weights or fp32 masters
_PREFER: ContextVar[str | None] = ContextVar("deltalens_prefer", default=None)


@contextlib.contextmanager
def preferring(kind: str | None) -> Iterator[None]:
    """Within this block a folder holding several weight sets (model.safetensors, pytorch_model.bin,
    a DCP checkpoint) is read through the set of this kind (`--prefer`); without it such a folder
    is refused, naming both."""
    if kind is not None and kind not in PREFER_CHOICES:
        raise ValueError(f"prefer one of {PREFER_CHOICES}, not {kind!r}")
    token = _PREFER.set(kind)
    try:
        yield
    finally:
        _PREFER.reset(token)


def _weight_sets(folder: Path) -> dict[str, Path]:
    """The complete weight sets a folder holds, by kind: safetensors (index, else model.safetensors),
    bin (index, else pytorch_model.bin), dcp (.metadata with .distcp files). A trainer's other files
    (training_args.bin, optimizer.pt, rng_state.pth, ...) are no weight set."""
    sets: dict[str, Path] = {}
    for kind, names in (
        ("safetensors", ("model.safetensors.index.json", "model.safetensors")),
        ("bin", ("pytorch_model.bin.index.json", "pytorch_model.bin")),
    ):
        found = next((folder / n for n in names if (folder / n).is_file()), None)
        if found is not None:
            sets[kind] = found
    if is_dcp(folder):
        sets["dcp"] = folder / DCP_METADATA
    from deltalens.worker import trainer_folders  # DeepSpeed and verl training folders

    sets.update(trainer_folders.weight_sets(folder))
    return sets


def _preferred_set() -> str | None:
    """The kind of weight set `--prefer` asks for (module / fp32: the DeepSpeed set)."""
    kind = _PREFER.get()
    return PREFER_SETS.get(kind, kind)


def _chosen_set(folder: Path) -> tuple[str, Path] | None:
    """(kind, anchor) of the weight set a folder is read through; two without `--prefer` are refused."""
    sets, kind = _weight_sets(folder), _preferred_set()
    if len(sets) > 1 and kind not in sets:
        choices = [c for c in PREFER_CHOICES if PREFER_SETS.get(c, c) in sets]
        raise InputError(
            folder,
            f"holds {len(sets)} weight sets ({' and '.join(p.name for p in sets.values())}): cannot tell "
            f"which is the model; pass --prefer {'|'.join(choices)}",
        )
    return (kind, sets[kind]) if len(sets) > 1 else next(iter(sets.items()), None)


def _prefer_notes(folder: Path) -> list[str]:
    sets, kind = _weight_sets(folder), _preferred_set()
    if len(sets) < 2 or kind not in sets:
        return []
    left = [p.name for k, p in sets.items() if k != kind]
    return [f"{folder.name}: {sets[kind].name} read (--prefer {_PREFER.get()}); ignored: {', '.join(left)}"]


def _directory_files(
    folder: Path, opened: dict[Path, os.stat_result] | None = None
) -> dict[str, Path] | list[Path]:
    """Either {tensor: shard} from an index, or the list of weight files to read whole (a DCP
    directory: its `.metadata` first, then its `.distcp` files)."""
    kind, chosen = _chosen_set(folder) or (None, None)
    if chosen is not None:
        from deltalens.worker import trainer_folders

        if kind in trainer_folders.KINDS:
            return trainer_folders.folder_files(kind, chosen, opened)
        if chosen.name in INDEX_NAMES:
            return _sharded(folder, chosen, opened)
        if chosen.name == DCP_METADATA:
            return [chosen, *sorted(folder.glob("*" + DCP_SUFFIX))]
        return [chosen]
    candidates = sorted(folder.glob("*.safetensors")) or sorted(
        p for s in PICKLE_SUFFIXES for p in folder.glob("*" + s)
    )
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise InputError(folder, "no model.safetensors, index or .bin state dict in this directory")
    raise InputError(folder, f"{len(candidates)} weight files and no index: cannot tell which is the model")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """Every file `open_checkpoint(path)` opens — config.json, the index, the weight files — found
    without reading a tensor or unpickling anything (the index is read; confinement applies)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    from deltalens.worker import adapters  # a LoRA adapter folder: its own files (the base is pinned apart)

    if adapters.is_adapter(path):
        return adapters.adapter_files(path)
    folder = path if path.is_dir() else path.parent
    files = [folder / "config.json"] if (folder / "config.json").is_file() else []
    if path.is_dir():
        found = _directory_files(path)
        if isinstance(found, dict):
            files += [path / n for n in INDEX_NAMES if (path / n).is_file()][:1]
            files += sorted(set(found.values()))
        else:
            files += found
    else:
        files.append(path)
    return files


def check_readable(path: str | os.PathLike, max_header: int | None = None) -> None:
    """Open a checkpoint as a worker will, on its own: a LoRA adapter folder is checked without its
    base (config, headers, factor shapes; the base is registered and checked as a checkpoint of its
    own), anything else is opened whole (headers, index, shards, pickles)."""
    from deltalens.worker import adapters

    if adapters.is_adapter(Path(path)):
        adapters.parse(Path(path), max_header)
    else:
        open_checkpoint(path, max_header)


def open_checkpoints(paths: list, max_header: int | None = None) -> list[Checkpoint]:
    """Base first, then the others; a LoRA adapter folder after the base is merged onto it (onto the
    base's own base when the base is an adapter too), see worker/adapters.py."""
    first = open_checkpoint(paths[0], max_header)
    base = getattr(first, "adapter", {}).get("base", first)
    return [first, *(open_checkpoint(p, max_header, base=base) for p in paths[1:])]


def open_checkpoint(
    path: str | os.PathLike, max_header: int | None = None, base: Checkpoint | None = None
) -> Checkpoint:
    """`max_header`: refuse safetensors headers longer than this (default: the safetensors limit).
    `base`: what a LoRA adapter folder is merged onto (None: the local path its config names)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    from deltalens.worker import adapters

    if adapters.is_adapter(path):
        return adapters.open_adapter(path, base, max_header)
    from deltalens.worker import trainer_folders

    if path.is_dir() and (chosen := _chosen_set(path)) is not None and chosen[0] in trainer_folders.KINDS:
        return trainer_folders.open_folder(path, *chosen)
    opened: dict[Path, os.stat_result] = {}  # every file read, as stat'ed through its own descriptor
    if path.is_dir():
        found = _directory_files(path, opened)
        checkpoint = Checkpoint(path, config=_read_config(path, opened))
        if isinstance(found, dict):
            readers: dict[Path, object] = {}
            for name, shard in found.items():
                if shard not in readers:
                    readers[shard] = _open_file(shard, opened, max_header)
                if name not in readers[shard].infos:
                    raise InputError(
                        shard, f"the index names tensor {name!r} but this shard does not hold it"
                    )
                checkpoint.files[name] = readers[shard]
        else:
            reader = _open_file(found[0], opened, max_header)
            checkpoint.files = {name: reader for name in reader.infos}
        checkpoint.notes += _prefer_notes(path)
    else:
        reader = _open_file(path, opened, max_header)
        checkpoint = Checkpoint(
            path, files={name: reader for name in reader.infos}, config=_read_config(path.parent, opened)
        )
    _verify_pin(path, opened)
    if not checkpoint.files:
        raise InputError(path, "checkpoint holds no tensors")
    for reader in {id(r): r for r in checkpoint.files.values()}.values():
        checkpoint.notes += getattr(reader, "notes", [])
    from deltalens.worker import quantized  # fp8 weights: code × scale, scales left out

    return quantized.dequantize(checkpoint)


# --- pickled uploads, checked without torch in the caller ------------------------------------------
_PICKLE_CHECK = (
    "import sys\n"
    "from deltalens.worker.checkpoint import _check_pickled_main\n"
    "sys.exit(_check_pickled_main(sys.argv[1:]))"
)


def check_pickled(
    path: str | os.PathLike, roots: Iterable[str | os.PathLike] = (), timeout: float = 300.0
) -> None:
    """Open a checkpoint that holds pickled state dicts exactly as a worker will (`open_checkpoint`:
    torch.load(weights_only=True), tensors only, names and dtypes checked, index and config too;
    confined to `roots` when given) — in a child process, so that the caller, the API, never imports
    torch. Raises InputError (or Unconfined) naming the bad file."""
    try:
        proc = subprocess.run(
            [sys.executable, "-P", "-c", _PICKLE_CHECK, os.fspath(path), *map(os.fspath, roots)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
    except subprocess.TimeoutExpired:
        raise InputError(path, f"checking this pickled checkpoint took over {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
        assert isinstance(verdict, dict)
    except (IndexError, ValueError, AssertionError):
        raise InputError(
            path, f"could not be checked as a torch state dict (the checker exited with {proc.returncode})"
        ) from None
    if not verdict.get("ok"):
        error = Unconfined if verdict.get("unconfined") else InputError
        raise error(verdict.get("path", path), str(verdict.get("problem", "unreadable")))


def _check_pickled_main(argv: list[str]) -> int:
    path, roots = argv[0], argv[1:]
    try:
        with confined(roots) if roots else contextlib.nullcontext():
            check_readable(path)
    except InputError as e:
        print(
            json.dumps(
                {"ok": False, "path": e.path, "problem": e.problem, "unconfined": isinstance(e, Unconfined)}
            )
        )
        return 0
    except Exception as e:  # whatever torch raises on bytes it cannot read: a reason, not a trace
        print(
            json.dumps(
                {
                    "ok": False,
                    "path": path,
                    "problem": f"cannot read as a torch state dict ({type(e).__name__})",
                }
            )
        )
        return 0
    print(json.dumps({"ok": True}))
    return 0
