"""Training-run folders as checkpoints: DeepSpeed ZeRO checkpoints and verl/FSDP actor folders.

**DeepSpeed** (layout as `deepspeed/runtime/engine.py` writes it and `deepspeed/utils/zero_to_fp32.py`
reads it; DeepSpeed commit edaa722): a root with a `latest` file naming the tag folder (`global_stepN/`),
or the tag folder itself, holding `mp_rank_00_model_states.pt` (ZeRO 0-2: the full weights under
`module`, in the compute dtype) or one `zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank (ZeRO-3:
`module` holds placeholders), plus one `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` per rank
with that rank's partition of the fp32 master weights (`single_partition_of_fp32_groups`, stage 1-2;
`fp32_flat_groups`, stage 3). When the optimizer partitions are there the default is the fp32 master
weights, rebuilt exactly as zero_to_fp32 does (the weights training really holds); `--prefer module`
reads `module` instead (what inference loads); `--prefer fp32` insists on the master weights.

**verl** (`verl/utils/checkpoint/fsdp_checkpoint_manager.py`, merged as `verl/model_merger/
fsdp_model_merger.py` does; verl commit b178a3c): an `actor/` folder (or the `global_step_N/` above it)
with `model_world_size_{W}_rank_{r}.pt` (FSDP sharded state dicts: DTensors placed `Shard(dim)` or
`Replicate()` on a 1-D `fsdp` or 2-D `(ddp, fsdp)` mesh, or plain tensors chunked on dim 0),
`fsdp_config.json` (`world_size`) and `huggingface/` (config.json; full weights when verl was told to
save them, which are then read instead). Tensors keep their stored dtype (the merger casts to bf16).

Everything is read with `torch.load(weights_only=True, mmap=True)`: DeepSpeed's few pickled helper
objects (loss scaler, ZeRO stage enum, fragment addresses, argparse.Namespace) are allowed by name and
rebuilt as inert stand-ins; DTensor classes are allowed by torch itself. Any other global refuses the
file. Rank files stay memory-mapped and every tensor is assembled on demand from the ranks' slices, so
memory holds one tensor at a time. Every file goes through the confinement layer and is pinned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from deltalens.worker import checkpoint as ck
from deltalens.worker.errors import InputError

KINDS = ("deepspeed", "verl")
LATEST = "latest"
DS_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
DS_OPTIM = re.compile(r"^((?:bf16_|fp16_)?)zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
DS_OTHER = re.compile(r"^(?:layer_\d+|expert_\d+|layer_\d+_expert_\d+|expp_rank_\d+)_.*\.pt$")
VERL_MODEL = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
FSDP_CONFIG = "fsdp_config.json"
HF_DIR = "huggingface"
MERGER = "export it with verl's model merger (python -m verl.model_merger merge --backend fsdp)"


# --- what a folder is (no file read, no torch: used by the API too) -----------------------------------
def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _is_ds_tag(folder: Path) -> bool:
    return any(DS_MODEL.match(n) for n in _names(folder))


def _is_verl_actor(folder: Path) -> bool:
    return (folder / FSDP_CONFIG).is_file() or any(VERL_MODEL.match(n) for n in _names(folder))


def weight_sets(folder: Path) -> dict[str, Path]:
    """The training-run weight set a folder holds, by kind, named by its anchor: a DeepSpeed root's
    `latest` file, a DeepSpeed tag folder, a verl actor folder (the folder or its `actor/`)."""
    if (folder / LATEST).is_file() and any(_is_ds_tag(folder / n) for n in _names(folder)):
        return {"deepspeed": folder / LATEST}
    if _is_ds_tag(folder):
        return {"deepspeed": folder}
    for actor in (folder, folder / "actor"):
        if actor.is_dir() and _is_verl_actor(actor):
            return {"verl": actor}
    return {}


def _ranked(folder: Path, matches: dict[int, str], what: str, count: int | None = None) -> list[Path]:
    """The files of ranks 0..n-1 (n = `count`, else as many as found); a gap is an error naming it."""
    count = len(matches) if count is None else count
    for rank in range(count):
        if rank not in matches:
            raise InputError(folder, f"{what.format(rank=rank)} is missing (rank {rank} of {count})")
    return [folder / matches[r] for r in range(count)]


class _DsLayout:
    """Which files of a DeepSpeed checkpoint are read, from their names alone."""

    def __init__(self, anchor: Path, opened: dict | None):
        self.root = anchor.parent if anchor.name == LATEST and anchor.is_file() else None
        self.tag = self._tag(anchor, opened) if self.root is not None else anchor
        models: dict[int, str] = {}
        optims: dict[int, str] = {}
        prefixes = set()
        for name in _names(self.tag):
            if (
                (m := DS_MODEL.match(name) or DS_OPTIM.match(name))
                and int(m.groups()[-1]) != 0
                or (DS_OTHER.match(name))
            ):
                raise InputError(
                    self.tag / name,
                    "model-parallel, pipeline or expert-parallel DeepSpeed files are not read",
                )
            if m := DS_OPTIM.match(name):
                optims[int(m[2])] = name
                prefixes.add(m[1])
            elif (m := DS_MODEL.match(name)) and m[1] is not None:
                models[int(m[1])] = name
        self.stage3 = not (self.tag / "mp_rank_00_model_states.pt").is_file()
        if len(prefixes) > 1:
            raise InputError(self.tag, "optimizer partitions of two kinds (bf16_ and not): cannot tell which")
        prefix = next(iter(prefixes), "")
        self.optim = _ranked(self.tag, optims, prefix + "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        self.models = (
            _ranked(
                self.tag, models, "zero_pp_rank_{rank}_mp_rank_00_model_states.pt", len(self.optim) or None
            )
            if self.stage3
            else [self.tag / "mp_rank_00_model_states.pt"]
        )
        prefer = ck._PREFER.get()
        self.fp32 = prefer != "module" and (bool(self.optim) or prefer == "fp32" or self.stage3)
        if self.fp32 and not self.optim:
            raise InputError(
                self.tag,
                "no *_optim_states.pt files: "
                + (
                    "a ZeRO-3 checkpoint's module entry holds placeholders, and its weights are rebuilt "
                    "from the optimizer partitions, which are not here"
                    if self.stage3
                    else "the fp32 master weights are not in this checkpoint (without --prefer fp32 its "
                    "module weights are read)"
                ),
            )
        if not self.fp32 and self.stage3:
            raise InputError(
                self.models[0],
                "ZeRO-3: the module entry holds placeholders, not weights; read the fp32 master weights "
                "(leave out --prefer module)",
            )

    @staticmethod
    def _tag(latest: Path, opened: dict | None) -> Path:
        tag = ck._read_text(latest, opened).strip()
        if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or "\x00" in tag:
            raise InputError(latest, f"does not name a tag folder ({tag[:60]!r})")
        if not (latest.parent / tag).is_dir():
            raise InputError(latest, f"names the tag {tag[:60]!r}, but there is no such folder")
        return latest.parent / tag

    def files(self) -> list[Path]:
        head = [self.root / LATEST] if self.root is not None else []
        return head + (self.models + self.optim if self.fp32 else self.models[:1])


class _VerlLayout:
    """Which files of a verl actor folder are read: huggingface/ when it holds full weights, else
    fsdp_config.json, huggingface/config.json and every rank's model file."""

    def __init__(self, actor: Path, opened: dict | None):
        self.actor, self.hf = actor, actor / HF_DIR
        self.full = self.hf.is_dir() and bool(ck._weight_sets(self.hf))
        if self.full:
            return
        found: dict[int, dict[int, str]] = {}
        for name in _names(actor):
            if m := VERL_MODEL.match(name):
                found.setdefault(int(m[1]), {})[int(m[2])] = name
        config = actor / FSDP_CONFIG
        self.config = config if config.is_file() else None
        if self.config is not None:
            try:
                size = json.loads(ck._read_text(config, opened)).get("world_size")
            except (ValueError, AttributeError, RecursionError):
                size = None
            if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1 << 20:
                raise InputError(config, "has no valid world_size")
        elif len(found) == 1:
            size = next(iter(found))
        else:
            raise InputError(actor, f"no {FSDP_CONFIG}, and rank files of {len(found)} world sizes")
        self.world_size = size
        self.ranks = _ranked(actor, found.get(size, {}), f"model_world_size_{size}_rank_{{rank}}.pt", size)

    def files(self) -> list[Path]:
        if self.full:
            return ck.checkpoint_files(self.hf)
        config = [self.hf / "config.json"] if (self.hf / "config.json").is_file() else []
        return ([self.config] if self.config else []) + config + self.ranks


_LAYOUTS = {"deepspeed": _DsLayout, "verl": _VerlLayout}


def folder_files(kind: str, anchor: Path, opened: dict | None = None) -> list[Path]:
    """Every file the reader of this weight set opens (a `latest` / fsdp_config.json is read)."""
    return _LAYOUTS[kind](anchor, opened).files()


# --- weights_only loading ----------------------------------------------------------------------------
class _Inert:
    """Stand-in for a harmless pickled helper object: built empty, its state dropped."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state) -> None:
        pass


# pickled DeepSpeed helpers (loss scaler, ZeRO stage, fragment addresses) and Megatron's args
_INERT = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScaleConfig",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "argparse.Namespace",
)
_AS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": int,
    "deepspeed.runtime.fp16.loss_scaler.LossScaleProfile": str,
}


def _allowed() -> list:
    return [(_Inert, name) for name in _INERT] + [(kind, name) for name, kind in _AS.items()]


@contextlib.contextmanager
def _quiet():
    """torch's DeviceMesh logs a warning when unpickled without a process group: not ours to show."""
    logger = logging.getLogger("torch.distributed.device_mesh")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load(path: Path, opened: dict | None) -> object:
    """torch.load(weights_only=True, mmap=True) of one confined file, with the allow-list above."""
    import torch

    fd = ck._open_fd(path, opened)
    try:
        with _quiet(), torch.serialization.safe_globals(_allowed()):
            return ck.PickledStateDict._load(ck._fd_path(fd, path))
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it calls {culprit.group(1)}" if culprit else "it holds more than tensors and plain data"
        raise InputError(path, f"refused to unpickle: {what}") from None
    except Exception as e:  # truncated or foreign bytes: torch's errors in one line
        raise InputError(path, f"not a readable torch.save file ({type(e).__name__})") from None
    finally:
        os.close(fd)


def _entry(obj: object, key: str, path: Path, kind: type | tuple = dict):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise InputError(path, f"no {key!r} entry of the expected kind: not a DeepSpeed file of this layout")
    return value


# --- tensors assembled on demand ---------------------------------------------------------------------
class LazyTensors:
    """A reader over tensors made on demand: name -> (shape, torch dtype, make()). The last tensor made
    is kept until released, so memory holds one at a time."""

    def __init__(self, path: Path, entries: dict[str, tuple[tuple, object, Callable]]):
        import torch

        dtypes = {getattr(torch, ck.torch_dtype_name(k)): k for k in ck.NUMPY_DTYPES}
        self.path, self.notes, self._make, self._cached = path, [], {}, None
        self.infos: dict[str, ck.Meta] = {}
        for name, (shape, dtype, make) in entries.items():
            shown = ck.check_name(path, name)
            if dtype not in dtypes:
                raise InputError(path, f"tensor {shown!r}: unsupported dtype {dtype}")
            numel = math.prod(shape)
            self.infos[name] = ck.Meta(tuple(shape), dtypes[dtype], numel * ck.DTYPE_SIZES[dtypes[dtype]])
            self._make[name] = make

    def meta(self, name: str) -> ck.Meta:
        return self.infos[name]

    def tensor(self, name: str):
        if self._cached is None or self._cached[0] != name:
            t = self._make[name]()
            if tuple(t.shape) != self.infos[name].shape:
                raise InputError(self.path, f"tensor {name[:80]!r}: assembled as {tuple(t.shape)}")
            self._cached = (name, t)
        return self._cached[1]

    def array(self, name: str):
        import torch

        t, dtype = self.tensor(name), self.infos[name].dtype
        if dtype in ck.RAW_BITS:
            t = t.view(torch.uint16 if dtype == "BF16" else torch.uint8)
        return t.numpy()

    def release(self, name: str) -> None:
        if self._cached is not None and self._cached[0] == name:
            self._cached = None


def _span(parts: list, lo: int, hi: int) -> list:
    """The pieces of the virtual concatenation of the 1-D `parts` that lie in [lo, hi)."""
    out, start = [], 0
    for t in parts:
        end = start + t.numel()
        if end > lo and start < hi:
            out.append(t[max(lo - start, 0) : min(hi, end) - start])
        start = end
    return out


def _cat(pieces: list):
    import torch

    return torch.cat(pieces) if pieces else torch.empty(0)


# --- DeepSpeed ---------------------------------------------------------------------------------------
def _flat_groups(optim: dict, path: Path, key: str) -> list:
    import torch

    groups = _entry(optim, key, path, (list, tuple))
    if not all(isinstance(g, torch.Tensor) and g.dim() == 1 and g.is_floating_point() for g in groups):
        raise InputError(path, f"{key} holds something other than flat float tensors")
    return list(groups)


def _shapes(model: dict, path: Path) -> list[dict[str, tuple]]:
    groups = model.get("param_shapes")
    if groups is None:
        raise InputError(
            path, "no param_shapes: not a ZeRO checkpoint, so no fp32 master weights; pass --prefer module"
        )
    ok = isinstance(groups, (list, tuple)) and all(
        isinstance(g, dict)
        and all(
            isinstance(n, str) and isinstance(s, tuple) and all(isinstance(d, int) and d >= 0 for d in s)
            for n, s in g.items()
        )
        for g in groups
    )
    if not ok:
        raise InputError(path, "param_shapes is not a list of {name: shape} groups")
    return [{n: tuple(s) for n, s in g.items()} for g in groups]


def _zero12(shapes, flats, files, entries) -> None:
    """Stage 1-2: a group is the ranks' partitions end to end; parameters follow each other in it
    (zero_to_fp32 `_zero2_merge_trainable_params`, alignment 2·world size)."""
    world, align = len(flats), 2 * len(flats)
    for g, group in enumerate(shapes):
        parts = [f[g] for f in flats]
        offset, avail = 0, sum(p.numel() for p in parts)
        for name, shape in group.items():
            n = math.prod(shape)
            entries[name] = (
                shape,
                parts[0].dtype,
                lambda p=parts, o=offset, n=n, s=shape: _cat(_span(p, o, o + n)).view(s),
            )
            offset += n
        if offset > avail or math.ceil(offset / align) != math.ceil(avail / align):
            raise InputError(
                files[0].parent,
                f"the fp32 partitions of group {g} hold {avail} values over {world} ranks; its parameters "
                f"need {offset}: a partition is truncated or does not belong to this checkpoint",
            )


def _zero3(shapes, flats, files, entries) -> None:
    """Stage 3: every parameter is padded to a multiple of the world size and split evenly; each rank
    holds its slices end to end (zero_to_fp32 `_zero3_merge_trainable_params`)."""
    world = len(flats)
    sizes = [sum(p.numel() for p in f) for f in flats]
    for r, size in enumerate(sizes):
        if size != sizes[0]:
            raise InputError(files[r], f"holds {size} fp32 values; rank 0 holds {sizes[0]}")
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        n = math.prod(shape)
        part = math.ceil(n / world)
        entries[name] = (
            shape,
            flats[0][0].dtype,
            lambda o=offset, p=part, n=n, s=shape: _cat([x for f in flats for x in _span(f, o, o + p)])[
                :n
            ].view(s),
        )
        offset += part
    if offset != sizes[0]:
        raise InputError(
            files[0].parent,
            f"each rank holds {sizes[0]} fp32 values; the parameters need {offset}: a partition is truncated "
            "or does not belong to this checkpoint",
        )


def _frozen(models: list[dict], stage3: bool, files: list[Path], entries) -> None:
    """Frozen parameters: whole in the model states (stage 1-2), or one slice per rank (stage 3)."""
    import torch

    shapes = models[0].get("frozen_param_shapes") or {}
    for name, shape in shapes.items():
        pieces = [m.get("frozen_param_fragments", {}).get(name) for m in models]
        if not all(isinstance(p, torch.Tensor) for p in pieces) or not isinstance(shape, tuple):
            raise InputError(files[0], f"frozen parameter {str(name)[:80]!r} has no fragment")
        shape, n = tuple(shape), math.prod(shape)
        make = (
            (lambda p=pieces, n=n, s=shape: torch.cat([x.reshape(-1) for x in p])[:n].view(s))
            if stage3
            else (lambda p=pieces[0], s=shape: p.reshape(s))
        )
        entries[name] = (shape, pieces[0].dtype, make)


def _open_deepspeed(path: Path, anchor: Path, opened: dict) -> tuple[object, list[str]]:
    import torch

    layout = _DsLayout(anchor, opened)
    tag = layout.tag.name
    if not layout.fp32:
        first = layout.models[0]
        notes: list[str] = []
        state = ck._unwrap_trainer_state(_load(first, opened), first, notes)
        entries = {n: (tuple(t.shape), t.dtype, lambda t=t: t) for n, t in state.items()}
        more = (
            "--prefer fp32 rebuilds the fp32 master weights"
            if layout.optim
            else "no optimizer partitions here"
        )
        notes.append(
            f"{path.name}: DeepSpeed checkpoint {tag}: its module weights (what inference loads; {more})"
        )
        return LazyTensors(first, entries), notes
    model = _load(layout.models[0], opened)
    for extra in layout.models[1:]:  # ZeRO-3 ranks' model states: opened (pinned), read for frozen parameters
        os.close(ck._open_fd(extra, opened))
    shapes = _shapes(model, layout.models[0])
    optims = [_entry(_load(f, opened), "optimizer_state_dict", f) for f in layout.optim]
    stage = optims[0].get("zero_stage")
    count = optims[0].get("partition_count")
    count = max(count) if isinstance(count, (list, tuple)) and count else count
    if not isinstance(stage, int) or stage not in (1, 2, 3) or not isinstance(count, int):
        raise InputError(layout.optim[0], "no zero_stage / partition_count: not a ZeRO optimizer partition")
    if count != len(layout.optim):
        shown = [f.name for f in layout.optim]
        missing = re.sub(r"rank_\d+_mp", f"rank_{len(shown)}_mp", shown[-1]) if count > len(shown) else None
        raise InputError(
            layout.tag,
            f"{missing} is missing (partition_count {count})"
            if missing
            else f"{len(shown)} optimizer partitions, but partition_count says {count}",
        )
    if (stage == 3) != layout.stage3:
        raise InputError(
            layout.tag, f"ZeRO-{stage} optimizer partitions next to the other stage's model states"
        )
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    flats = [_flat_groups(o, f, key) for o, f in zip(optims, layout.optim)]
    if any(len(f) != (len(flats[0]) if stage == 3 else len(shapes)) for f in flats):
        raise InputError(layout.tag, f"the ranks' {key} do not match the parameter groups")
    entries: dict[str, tuple] = {}
    module = model.get("module") if isinstance(model.get("module"), dict) else {}
    for name in model.get("buffer_names") or []:  # zero_to_fp32 keeps buffers, upcast to float
        t = module.get(name)
        if isinstance(t, torch.Tensor):
            entries[name] = (
                tuple(t.shape),
                torch.float32 if t.is_floating_point() else t.dtype,
                lambda t=t: t.float() if t.is_floating_point() else t,
            )
    models = [model] + (
        [_load(f, opened) for f in layout.models[1:]]
        if layout.stage3 and model.get("frozen_param_shapes")
        else []
    )
    _frozen(models, layout.stage3, layout.models, entries)
    (_zero3 if stage == 3 else _zero12)(shapes, flats, layout.optim, entries)
    for alias, source in (model.get("shared_params") or {}).items():
        if source in entries:
            entries[alias] = entries[source]
    where = f"{tag}, tag from {LATEST}" if layout.root is not None else tag
    note = (
        f"{path.name}: DeepSpeed ZeRO-{stage} checkpoint ({where}, {count} ranks): the fp32 master weights, "
        "rebuilt from the optimizer partitions as zero_to_fp32 does; --prefer module reads the module weights"
    )
    return LazyTensors(layout.tag, entries), [note]


# --- verl --------------------------------------------------------------------------------------------
def _placement(t, hsdp: bool, path: Path, name: str):
    """("shard", dim) or ("replicate",) for a DTensor, by the merger's rules; None for a plain tensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return None
    placements = tuple(t.placements)[1:] if hsdp else tuple(t.placements)
    if len(placements) == 1 and type(placements[0]) is Shard:
        return ("shard", placements[0].dim)
    if len(placements) == 1 and type(placements[0]) is Replicate:
        return ("replicate",)
    raise InputError(path, f"tensor {name[:80]!r} is placed {placements}: not read here; {MERGER}")


def _open_verl(path: Path, actor: Path, opened: dict) -> tuple[object, list[str], dict]:
    import torch
    import torch.distributed.tensor  # noqa: F401  (registers the DTensor classes as weights_only-safe)
    from torch.distributed.tensor import DTensor

    layout = _VerlLayout(actor, opened)
    if layout.full:
        inner = ck.open_checkpoint(layout.hf)
        for f in ck.checkpoint_files(layout.hf):  # the outer checkpoint's pins cover them
            os.close(ck._open_fd(f, opened))
        weights = " and ".join(p.name for p in ck._weight_sets(layout.hf).values())
        note = (
            f"{path.name}: verl actor folder: the full weights it saved under {HF_DIR}/ ({weights}); "
            "rank files not read"
        )
        return inner, [note, *inner.notes], inner.config
    config = ck._read_config(layout.hf, opened)
    for f in layout.ranks:  # every rank file opened and pinned; the merger reads the first `shards`
        os.close(ck._open_fd(f, opened))
    first = _load(layout.ranks[0], opened)
    pivot = (
        next((v for v in first.values() if isinstance(v, DTensor)), None) if isinstance(first, dict) else None
    )
    names = pivot.device_mesh.mesh_dim_names if pivot is not None else None
    shape = tuple(pivot.device_mesh.mesh.shape) if pivot is not None else (layout.world_size,)
    hsdp = len(shape) == 2 and bool(names) and names[0] in ("dp", "ddp")
    if len(shape) != 1 and not hsdp:
        raise InputError(
            layout.ranks[0], f"device mesh {names or shape} (tensor parallel?) is not read here; {MERGER}"
        )
    shards = shape[-1]
    if shards * (shape[0] if hsdp else 1) != layout.world_size:
        raise InputError(
            layout.ranks[0], f"device mesh {shape} does not match world size {layout.world_size}"
        )
    ranks = [first] + [_load(f, opened) for f in layout.ranks[1:shards]]
    for f, state in zip(layout.ranks, ranks):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f, "not a state dict of tensors")
        if set(state) != set(first):
            raise InputError(f, f"holds other tensor names than {layout.ranks[0].name}")
    entries = {}
    for name in first:
        entries[name] = _verl_entry(name, [s[name] for s in ranks], hsdp, layout.ranks)
    note = (
        f"{path.name}: verl actor folder ({layout.world_size} ranks, {shards} shards): FSDP shards merged as "
        "verl's model merger does, in their stored dtype"
    )
    return LazyTensors(actor, entries), [note], config


def _verl_entry(name: str, tensors: list, hsdp: bool, files: list[Path]):
    import torch

    places = [_placement(t, hsdp, f, name) for t, f in zip(tensors, files)]
    if any(p != places[0] for p in places):
        raise InputError(files[0].parent, f"tensor {name[:80]!r} is placed differently on different ranks")
    locals_ = [t._local_tensor if places[0] is not None else t for t in tensors]
    place = places[0] or ("shard", 0)
    if place[0] == "replicate":
        make = lambda: locals_[0]  # noqa: E731
    else:
        make = lambda: torch.cat(locals_, dim=place[1])  # noqa: E731
    if places[0] is not None:
        shape = tuple(tensors[0].shape)
    else:
        rest = {tuple(t.shape[1:]) for t in locals_}
        if any(t.dim() == 0 for t in locals_) or len(rest) != 1:
            raise InputError(files[0].parent, f"tensor {name[:80]!r}: its rank pieces do not stack on dim 0")
        shape = (sum(t.shape[0] for t in locals_), *rest.pop())
    dim = place[1] if place[0] == "shard" else None
    if dim is not None and (
        not 0 <= dim < len(shape)
        or sum(t.shape[dim] for t in locals_) != shape[dim]
        or any(
            tuple(t.shape[:dim]) + tuple(t.shape[dim + 1 :]) != shape[:dim] + shape[dim + 1 :]
            for t in locals_
        )
    ):
        raise InputError(files[0].parent, f"tensor {name[:80]!r}: its rank shards do not add up to {shape}")
    return shape, locals_[0].dtype, make


# --- the checkpoint -----------------------------------------------------------------------------------
def open_folder(path: Path, kind: str, anchor: Path) -> ck.Checkpoint:
    """The checkpoint of a DeepSpeed or verl folder (`kind`, `anchor` from `weight_sets`)."""
    opened: dict = {}
    config = ck._read_config(path, opened)
    if kind == "deepspeed":
        reader, notes = _open_deepspeed(path, anchor, opened)
        inner = None
    else:
        reader, notes, inner_config = _open_verl(path, anchor, opened)
        config = config or inner_config
        inner = reader if isinstance(reader, ck.Checkpoint) else None
    checkpoint = ck.Checkpoint(path, config=config)
    checkpoint.files = dict(inner.files) if inner is not None else {n: reader for n in reader.infos}
    checkpoint.notes += ck._prefer_notes(path) + notes
    ck._verify_pin(path, opened)
    if not checkpoint.files:
        raise InputError(path, "checkpoint holds no tensors")
    return checkpoint
