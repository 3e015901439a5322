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
import json
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
from deltalens.worker.safetensors_header import MAX_NAME_LENGTH, UNSAFE_NAME, TensorInfo, read_header

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
            mapped.madvise(MADV_POPULATE_READ, start, i.end - start)
        except OSError:
            pass  # kernels before Linux 5.14: pages fault in as they are read
        return np.frombuffer(mapped, dtype=dtype, count=i.numel, offset=i.start).reshape(i.shape)

    def tensor(self, name: str):
        return to_torch(self.array(name), self.infos[name].dtype)

    def release(self, name: str) -> None:
        i = self.infos[name]
        if self._map is not None and i.nbytes:
            start = i.start - i.start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, i.end - start)


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
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise InputError(path, "not a state dict (expected a mapping of names to tensors)")
        names = {getattr(torch, torch_dtype_name(k)): k for k in NUMPY_DTYPES}
        for name, t in obj.items():  # the rules a safetensors header is held to
            shown = name if len(name) <= 80 else name[:77] + "..."
            if len(name) > MAX_NAME_LENGTH:
                raise InputError(path, f"tensor name longer than {MAX_NAME_LENGTH} characters: {shown!r}")
            if UNSAFE_NAME.search(name):
                raise InputError(
                    path, f"tensor name {shown!r} holds markup, quotes, control characters or a '..' segment"
                )
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


@dataclass
class Checkpoint:
    """A model checkpoint: tensor names mapped to the file that holds them, plus config.json."""

    path: Path
    files: dict[str, SafetensorsFile | PickledStateDict] = field(default_factory=dict)  # tensor name -> file
    config: dict = field(default_factory=dict)

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


def _directory_files(
    folder: Path, opened: dict[Path, os.stat_result] | None = None
) -> dict[str, Path] | list[Path]:
    """Either {tensor: shard} from an index, or the list of weight files to read whole."""
    for index_name in INDEX_NAMES:
        if (folder / index_name).is_file():
            return _sharded(folder, folder / index_name, opened)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
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


def open_checkpoint(path: str | os.PathLike, max_header: int | None = None) -> Checkpoint:
    """`max_header`: refuse safetensors headers longer than this (default: the safetensors limit)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
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
    else:
        reader = _open_file(path, opened, max_header)
        checkpoint = Checkpoint(
            path, files={name: reader for name in reader.infos}, config=_read_config(path.parent, opened)
        )
    _verify_pin(path, opened)
    if not checkpoint.files:
        raise InputError(path, "checkpoint holds no tensors")
    return checkpoint


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
            open_checkpoint(path)
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
