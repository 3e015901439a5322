"""PEFT LoRA adapters as virtual checkpoints: the merged model, one tensor at a time.

An adapter folder (`adapter_config.json` + `adapter_model.safetensors` or `adapter_model.bin`)
is opened against a base checkpoint and read as the model `merge_and_unload()` would store:

* an adapted module's weight is W + ΔW with ΔW = scale·B·A (scale = α/r, α/√r with `use_rslora`,
  r and α per module from `rank_pattern` / `alpha_pattern`; transposed for `fan_in_fan_out` and
  for embeddings), computed in float64 and rounded once (to nearest, ties to even) to the base
  dtype — so the pair analysis compares stored merged weights with stored base weights;
* a tensor the adapter saves whole (`modules_to_save`, `base_layer` of saved embeddings, trained
  biases) replaces the base's; LoRA is added on top of a replaced weight;
* every other tensor is the base's own, so it is reported as unchanged, never skipped.

`exact_figures` adds what rounding hides: for each adapted module, counts of the exact float64 ΔW
at every τ, its Frobenius norm, rank (= r for generic A, B) and singular values, from the r×r core
of B·A (no m×n SVD). Nothing here unpickles except `torch.load(weights_only=True)` through the
checkpoint readers, and every file is opened through the confinement layer.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltalens.worker import checkpoint as ck
from deltalens.worker.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGEABLE = ("F16", "BF16", "F32", "F64")  # base dtypes a merged weight is rounded to
PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")  # optional adapter name
_LORA_EMB = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_LORA_BIAS = re.compile(r"^(?P<mod>.+)\.lora_B(?:\.[^.]+)?\.bias$")
_SAVED = re.compile(r"^(?P<mod>.+?)\.(?:modules_to_save(?:\.[^.]+)?|base_layer)\.(?P<leaf>[^.]+)$")
_CHUNK = 1 << 20  # float64 elements per row chunk of a merged tensor


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def adapter_files(path: Path) -> list[Path]:
    """The files an adapter checkpoint opens itself (its base is a checkpoint of its own)."""
    _refuse_full_weights(path)
    return [path / ADAPTER_CONFIG, _weights_file(path)]


def _refuse_full_weights(path: Path) -> None:
    full = [n for n in (*ck.INDEX_NAMES, "model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
    if full:
        raise InputError(
            path,
            f"holds both a LoRA adapter ({ADAPTER_CONFIG}) and full weights ({full[0]}): "
            "cannot tell which is meant; move one of them out",
        )


def _weights_file(path: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise InputError(path, f"{ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin")


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict
    alpha_pattern: dict
    base_model: str | None

    def scale_for(self, module: str) -> tuple[int, float, float]:
        """(r, α, scale) of one module (its name without the `base_model.model.` prefix)."""
        r = _pattern(self.rank_pattern, module, self.r)
        alpha = _pattern(self.alpha_pattern, module, self.alpha)
        return r, alpha, alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of the module's name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            if module == key or module.endswith("." + key):
                return value
    return default


def read_config(path: Path, opened: dict | None) -> LoraConfig:
    file = path / ADAPTER_CONFIG
    try:
        raw = json.loads(ck._read_text(file, opened))
    except (ValueError, RecursionError) as e:
        raise InputError(file, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(file, "not a JSON object")
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(file, f"peft_type {kind!r} is not supported; only LoRA adapters are read")
    for flag in ("use_dora", "use_qalora"):
        if raw.get(flag):
            raise InputError(file, f"{flag} adapters are not supported (their merge is not W + (α/r)·B·A)")

    def positive(value, what, integer):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
            raise InputError(
                file, f"{what} must be a positive {'integer' if integer else 'number'}, got {value!r}"
            )
        return value

    r = positive(raw.get("r", 8), "r", True)
    alpha = positive(raw.get("lora_alpha", 8), "lora_alpha", False)
    patterns = {}
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        table = raw.get(key) or {}
        if not isinstance(table, dict):
            raise InputError(file, f"{key} must be an object")
        patterns[key] = {str(k): positive(v, f"{key}[{k!r}]", integer) for k, v in table.items()}
    base = raw.get("base_model_name_or_path")
    return LoraConfig(
        r,
        float(alpha),
        bool(raw.get("use_rslora", False)),
        bool(raw.get("fan_in_fan_out", False)),
        patterns["rank_pattern"],
        patterns["alpha_pattern"],
        base if isinstance(base, str) and base else None,
    )


# --- float64 in, base dtype out ------------------------------------------------------------------
def as_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype in ("F16", "F32", "F64"):
        return array.astype(np.float64)
    if dtype in ck.RAW_BITS:
        return ck.to_torch(array, dtype).double().numpy()
    raise ValueError(dtype)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> the storage array of `dtype`, rounded once to nearest (ties to even)."""
    if dtype == "F64":
        return x
    if dtype in ("F32", "F16"):  # NumPy converts float64 directly, correctly rounded
        return x.astype(np.float32 if dtype == "F32" else np.float16)
    # BF16: round to odd into float32 (no double rounding: 16 spare bits), then to nearest even
    f = x.astype(np.float32)
    bits = f.view(np.uint32).copy()
    back = f.astype(np.float64)
    inexact = back != x
    away = inexact & (np.abs(back) > np.abs(x))  # rounded away from zero: step back towards it
    bits[away] -= 1
    bits[inexact] |= 1
    nan = np.isnan(x)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out[nan] = 0x7FC0
    return out


# --- the virtual tensors ---------------------------------------------------------------------------
class _Renamed:
    """A tensor stored under another name (a saved module replacing the base's)."""

    def __init__(self, reader, stored: str):
        self.reader, self.stored = reader, stored

    def meta(self, name):
        return self.reader.meta(self.stored)

    def array(self, name):
        return self.reader.array(self.stored)

    def tensor(self, name):
        return self.reader.tensor(self.stored)

    def release(self, name):
        self.reader.release(self.stored)


@dataclass
class Module:
    """One adapted weight: base name, where its unmerged value comes from, and the LoRA factors."""

    name: str  # tensor name in the base
    source: object  # reader of the unmerged value (the base's, or a saved replacement)
    source_name: str
    a: str  # tensor names in the adapter file
    b: str
    r: int
    alpha: float
    scale: float
    transpose: bool  # ΔW = (B·A)ᵀ: fan_in_fan_out, embeddings
    bias: str | None = None  # lora_B bias, for a `.bias` module


class _Merged:
    """W + scale·B·A of one module, computed in float64 row chunks, rounded to W's dtype."""

    def __init__(self, module: Module, adapter):
        self.m, self.adapter = module, adapter

    def meta(self, name):
        return self.m.source.meta(self.m.source_name)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) in float64 with ΔW = left @ right (scale folded into left)."""
        m, ad = self.m, self.adapter
        a = as_float64(ad.array(m.a), ad.meta(m.a).dtype)
        b = as_float64(ad.array(m.b), ad.meta(m.b).dtype) * m.scale
        return (a.T, b.T) if m.transpose else (b, a)

    def array(self, name):
        meta = self.meta(name)
        base = self.m.source.array(self.m.source_name)
        if self.m.bias is not None:
            bias = as_float64(self.adapter.array(self.m.bias), self.adapter.meta(self.m.bias).dtype)
            return round_to(as_float64(base, meta.dtype) + self.m.scale * bias, meta.dtype)
        left, right = self.factors()
        out = np.empty(base.shape, dtype=ck.NUMPY_DTYPES[meta.dtype])
        step = max(1, _CHUNK // max(1, base.shape[1]))
        for start in range(0, base.shape[0], step):
            stop = start + step
            exact = as_float64(base[start:stop], meta.dtype) + left[start:stop] @ right
            out[start:stop] = round_to(exact, meta.dtype)
        return out

    def tensor(self, name):
        return ck.to_torch(self.array(name), self.meta(name).dtype)

    def release(self, name):
        self.m.source.release(self.m.source_name)


def _resolve(base_names: set[str], key: str) -> str | None:
    """The base tensor a module key names: exactly, or the one name that differs only by a prefix."""
    if key in base_names:
        return key
    hits = [n for n in base_names if n.endswith("." + key) or key.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


@dataclass
class Parsed:
    """An adapter folder read on its own: config, weights file, and its tensors sorted into LoRA
    factors per module and whole saved tensors (keyed by the base name they replace, unresolved)."""

    config: LoraConfig
    weights: Path
    reader: object
    modules: dict[str, dict]  # module key -> {"A": name, "B": name, "emb": bool, "bias": name}
    saved: dict[str, str]  # base tensor key -> adapter tensor name


def parse(path: Path, max_header: int | None = None) -> Parsed:
    """Everything about an adapter that can be checked without its base (what registering it in the
    service validates): config, headers, factor names, factor shapes against r."""
    _refuse_full_weights(path)
    opened: dict = {}
    config = read_config(path, opened)
    weights = _weights_file(path)
    adapter = ck._open_file(weights, opened, max_header)
    ck._verify_pin(path, opened)
    modules: dict[str, dict] = {}
    saved: dict[str, str] = {}
    for stored in adapter.infos:
        key = stored[len(PREFIX) :] if stored.startswith(PREFIX) else stored
        if "lora_magnitude_vector" in key:
            raise InputError(weights, f"{stored!r}: DoRA adapters are not supported")
        if (hit := _LORA_BIAS.match(key)) is not None:
            modules.setdefault(hit["mod"], {})["bias"] = stored
        elif (hit := _LORA.match(key) or _LORA_EMB.match(key)) is not None:
            entry = modules.setdefault(hit["mod"], {})
            entry[hit["ab"]], entry["emb"] = stored, hit.re is _LORA_EMB
        elif ".original_module." in key:
            continue  # the untouched copy peft keeps next to a module it saves
        elif ".lora_" in key:
            raise InputError(weights, f"tensor {stored!r} is not a LoRA factor deltalens knows")
        else:
            hit = _SAVED.match(key)
            saved[f"{hit['mod']}.{hit['leaf']}" if hit else key] = stored
    for mod, entry in modules.items():
        if ("A" in entry) != ("B" in entry):
            raise InputError(weights, f"LoRA module {mod!r} lacks its lora_{'B' if 'A' in entry else 'A'}")
        if "A" in entry:
            a, b = adapter.meta(entry["A"]).shape, adapter.meta(entry["B"]).shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise InputError(weights, f"LoRA module {mod!r}: A {list(a)} and B {list(b)} do not multiply")
            r = config.scale_for(mod)[0]
            if a[0] != r:
                raise InputError(
                    weights, f"LoRA module {mod!r}: A has {a[0]} rows but r = {r} in {ADAPTER_CONFIG}"
                )
    if not modules and not saved:
        raise InputError(weights, "holds no LoRA factors and no saved modules")
    return Parsed(config, weights, adapter, modules, saved)


def open_adapter(path: Path, base: ck.Checkpoint | None, max_header: int | None = None) -> ck.Checkpoint:
    """The merged model of the adapter in `path` on `base` (None: its `base_model_name_or_path`, when
    that is a local checkpoint)."""
    parsed = parse(path, max_header)
    config, weights, adapter = parsed.config, parsed.weights, parsed.reader
    if base is None:
        where = config.base_model
        if not where or not Path(where).exists():
            shown = f"its base {where!r} is not a local path" if where else "it names no base model"
            raise InputError(
                path, f"LoRA adapter: {shown}; name the base checkpoint first (deltalens analyze BASE {path})"
            )
        base = ck.open_checkpoint(where, max_header)
    base_names = set(base.names())
    files = dict(base.files)
    replaced = {_resolve(base_names, key) or key: stored for key, stored in parsed.saved.items()}
    for name, stored in replaced.items():
        files[name] = _Renamed(adapter, stored)
    merged: list[Module] = []
    for mod, entry in parsed.modules.items():
        for leaf in ("weight", "bias"):
            if leaf == "bias" and "bias" not in entry:
                continue
            if leaf == "weight" and not ("A" in entry or "B" in entry):
                continue
            name = _resolve(base_names | set(replaced), f"{mod}.{leaf}")
            if name is None:
                raise InputError(weights, f"LoRA module {mod!r} has no {leaf} in the base checkpoint")
            r, alpha, scale = config.scale_for(mod)
            source = files[name]
            meta = source.meta(name)
            if meta.dtype not in MERGEABLE:
                raise InputError(weights, f"LoRA on {name!r}: a {meta.dtype} base weight cannot be merged")
            if leaf == "bias":
                if tuple(adapter.meta(entry["bias"]).shape) != tuple(meta.shape):
                    raise InputError(
                        weights, f"LoRA bias {entry['bias']!r} does not fit {name!r} {meta.shape}"
                    )
                merged.append(Module(name, source, name, "", "", r, alpha, scale, False, entry["bias"]))
                continue
            a, b = adapter.meta(entry["A"]).shape, adapter.meta(entry["B"]).shape
            transpose = entry.get("emb", False) or config.fan_in_fan_out
            product = (a[1], b[0]) if transpose else (b[0], a[1])
            if tuple(meta.shape) != product:
                raise InputError(
                    weights,
                    f"LoRA module {mod!r}: B·A is {list(product)}, the base {name!r} is {list(meta.shape)}",
                )
            merged.append(Module(name, source, name, entry["A"], entry["B"], r, alpha, scale, transpose))
    for module in merged:
        files[module.name] = _Merged(module, adapter)
    result = ck.Checkpoint(path, files=files, config=base.config)
    result.adapter = {
        "modules": merged,
        "reader": adapter,
        "config": config,
        "replaced": sorted(replaced),
        "base": base,
    }
    return result


# --- exact figures of ΔW ---------------------------------------------------------------------------
def exact_figures(checkpoint: ck.Checkpoint, taus: list[float], relative: bool) -> dict:
    """Per adapted module: counts of the exact ΔW at each τ, ‖ΔW‖, rank and singular values."""
    from deltalens.worker.metrics import spectrum_metrics

    info = checkpoint.adapter
    out = []
    for m in info["modules"]:
        reader = checkpoint.files[m.name]
        meta = reader.meta(m.name)
        counts, sq = [0] * len(taus), 0.0
        if m.bias is not None:
            bias = info["reader"]
            delta = m.scale * as_float64(bias.array(m.bias), bias.meta(m.bias).dtype)
            blocks = [
                (delta.reshape(1, -1), as_float64(m.source.array(m.source_name), meta.dtype).reshape(1, -1))
            ]
            sigma, rows, cols = None, 1, 1
        else:
            left, right = reader.factors()
            base = m.source.array(m.source_name)
            step = max(1, _CHUNK // max(1, base.shape[1]))
            blocks = (
                (left[s : s + step] @ right, as_float64(base[s : s + step], meta.dtype) if relative else None)
                for s in range(0, base.shape[0], step)
            )
            rows, cols = base.shape
            q_left, r_left = np.linalg.qr(left)  # ΔW = QL RL (QR Rᵀ)ᵀ: σ(ΔW) = σ(RL RRᵀ)
            q_right, r_right = np.linalg.qr(right.T)
            core = np.linalg.svd(r_left @ r_right.T, compute_uv=False)
            sigma = np.zeros(min(rows, cols))
            sigma[: len(core)] = core
        for delta, base_values in blocks:
            sq += float((delta * delta).sum())
            bound = np.abs(base_values) if relative else None
            for i, tau in enumerate(taus):
                counts[i] += int((np.abs(delta) > (tau * bound if relative else tau)).sum())
        m.source.release(m.source_name)
        figures = {
            "name": m.name,
            "r": m.r,
            "alpha": m.alpha,
            "scale": m.scale,
            "numel": math.prod(meta.shape),
            "changed": [{"tau": t, "count": c} for t, c in zip(taus, counts)],
            "norm_delta": math.sqrt(sq),
        }
        if sigma is not None:
            spec = spectrum_metrics(sigma, rows, cols)
            figures.update(
                rank=spec["rank"],
                full_rank=spec["full_rank"],
                singular_values=[float(s) for s in sigma[: max(m.r, spec["rank"])]],
            )
        out.append(figures)
    config = info["config"]
    return {
        "adapter": os.fspath(checkpoint.path),
        "r": config.r,
        "alpha": config.alpha,
        "use_rslora": config.rslora,
        "replaced": info["replaced"],
        "modules": out,
    }


def annotate(document: dict, checkpoints: list, taus: list[float], relative: bool) -> None:
    """Add `adapters` (exact ΔW figures of every LoRA input, each against the plain base) to a
    pair document; nothing when no input is an adapter."""
    found = [
        {"input": i, **exact_figures(c, taus, relative)}
        for i, c in enumerate(checkpoints)
        if getattr(c, "adapter", None)
    ]
    if found:
        document["adapters"] = found
