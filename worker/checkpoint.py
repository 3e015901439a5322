"""Lazy, memory-mapped checkpoint readers.

`open_checkpoint(path)` accepts an HF directory (single or sharded safetensors, or a pickled
`pytorch_model.bin`), a lone `.safetensors` file, or a `.bin`/`.pt` state dict. Tensors come
back as zero-copy views of the mapped file — NumPy arrays (`array`, bfloat16 as raw uint16) or
torch tensors (`tensor`); `release(name)` hands the pages back so resident memory stays
O(one tensor), not O(model). torch is imported only when a torch tensor is asked for.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltalens.worker.errors import InputError
from deltalens.worker.safetensors_header import TensorInfo, read_header

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


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: BF16, F32, ...
    nbytes: int


class SafetensorsFile:
    """One .safetensors file, validated, mapped once, read tensor by tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.infos: dict[str, TensorInfo] = read_header(path)[0]
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: writable (never written) arrays, which torch.from_numpy accepts silently.
                self._map = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(self.path) else None
                )
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

    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = self._load(path)
        except pickle.UnpicklingError as e:
            culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it calls {culprit.group(1)}" if culprit else "it holds more than tensors"
            raise InputError(
                path, f"refused to unpickle: {what}; only plain state dicts of tensors are read"
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise InputError(
                path,
                f"cannot read as a torch state dict: "
                f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise InputError(path, "not a state dict (expected a mapping of names to tensors)")
        self.tensors = obj
        self.infos = obj
        names = {getattr(torch, torch_dtype_name(k)): k for k in NUMPY_DTYPES}
        self.dtypes = {name: names.get(t.dtype, str(t.dtype)) for name, t in obj.items()}

    @staticmethod
    def _load(path: Path):
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


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        return PickledStateDict(path)
    raise InputError(
        path, "unsupported file type (expected .safetensors, .bin, .pt or a checkpoint directory)"
    )


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(config_path, f"config.json is not valid JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def _sharded(folder: Path, index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError, RecursionError):
        raise InputError(index_path, "index is not JSON with a 'weight_map' object") from None
    root = folder.resolve()
    shards = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str):
            raise InputError(index_path, f"weight_map entry for {name!r} is not a file name")
        target = (folder / rel).resolve()
        if root not in target.parents:
            raise InputError(index_path, f"shard path {rel!r} leaves the checkpoint folder")
        if not target.is_file():
            raise InputError(index_path, f"shard {rel!r} is missing")
        shards[name] = target
    return shards


def _directory_files(folder: Path) -> dict[str, Path] | list[Path]:
    """Either {tensor: shard} from an index, or the list of weight files to read whole."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            return _sharded(folder, folder / index_name)
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


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_dir():
        found = _directory_files(path)
        checkpoint = Checkpoint(path, config=_read_config(path))
        if isinstance(found, dict):
            opened: dict[Path, object] = {}
            for name, shard in found.items():
                if shard not in opened:
                    opened[shard] = _open_file(shard)
                if name not in opened[shard].infos:
                    raise InputError(
                        shard, f"the index names tensor {name!r} but this shard does not hold it"
                    )
                checkpoint.files[name] = opened[shard]
        else:
            reader = _open_file(found[0])
            checkpoint.files = {name: reader for name in reader.infos}
    else:
        reader = _open_file(path)
        checkpoint = Checkpoint(
            path, files={name: reader for name in reader.infos}, config=_read_config(path.parent)
        )
    if not checkpoint.files:
        raise InputError(path, "checkpoint holds no tensors")
    return checkpoint
