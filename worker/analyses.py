"""The three analyses — pair, series, overlap — as streams over aligned tensors.

Each one opens its checkpoints lazily, walks the tensor names they share, cuts every tensor
into its matrices (`families.parts_of`), feeds row chunks to a kernel accumulator and turns the
accumulated counts into an `AnalysisResult`: the `--json` document plus the per-matrix detail
(histograms, spectra, update maps) that goes to DuckDB.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deltalens.worker import adapters, fused, fused_masks, geometry, mask_stats, precision
from deltalens.worker.checkpoint import Checkpoint, open_checkpoints
from deltalens.worker.contract import BLOCKS, MATRIX_TYPES, MAX_OVERLAP_RUNS
from deltalens.worker.errors import InputError
from deltalens.worker.families import Layout, Part, detect_family, parts_of
from deltalens.worker.metrics import MAP_CELLS, bin_bounds
from deltalens.worker.prefetch import CudaStager, prefetched

DEFAULT_TAU = 1e-5
Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, current tensor)


@dataclass
class Options:
    taus: list[float] = field(default_factory=lambda: [DEFAULT_TAU])
    relative: bool = False
    rank: bool = True
    geometry: bool = True  # pair: ΔW against W₀'s singular subspaces, mask enrichment (worker.geometry)
    device: str | None = None  # None: CUDA when available, else CPU
    chunk_elements: int | None = None  # None: per-device default
    fused: bool | None = None  # on CPU: the one-pass C kernels (None: when available)
    progress: Progress | None = None
    names: list[str] | None = None  # only these tensors (one part of a fanned-out analysis)
    unstored: bool = False  # with `names`: also the aligned tensors the base does not store (tied heads)

    def resolved_device(self) -> str:
        if self.device in (None, "auto"):
            return "cuda" if _cuda_available() else "cpu"
        if self.device.startswith("cuda") and not _cuda_available():
            raise InputError("--device", "CUDA was requested but no CUDA device is available")
        return self.device

    def use_fused(self, device: str) -> bool:
        return (
            device == "cpu"
            and fused.AVAILABLE
            and self.fused is not False
            and len(self.taus) <= fused.MAX_TAUS
        )


def _cuda_available() -> bool:
    """Without an NVIDIA device node there is no CUDA: answer without importing torch."""
    if not (Path("/dev/nvidiactl").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    import torch

    return torch.cuda.is_available()


@dataclass
class AnalysisResult:
    kind: str
    document: dict  # exactly what --json writes
    details: list[dict] = field(default_factory=list)  # per matrix: histograms, spectrum, map, run
    family: str = "generic"
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------
# Alignment and streaming
# ---------------------------------------------------------------------------------------------
_VOCAB = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|embed_out|lm_head|word_embeddings|shared)\.weight$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.weight$")


class _Aliased:
    """A checkpoint whose tied output head is read from its input embedding (`lm_head.weight` not
    stored because `tie_word_embeddings` saved it once)."""

    def __init__(self, inner: Checkpoint, alias: dict[str, str]):
        self.inner, self.alias = inner, alias

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def meta(self, name):
        return self.inner.meta(self.alias.get(name, name))

    def tensor(self, name):
        return self.inner.tensor(self.alias.get(name, name))

    def array(self, name):
        return self.inner.array(self.alias.get(name, name))

    def release(self, name):
        self.inner.release(self.alias.get(name, name))

    def nonfinite(self, name, *args):
        return self.inner.nonfinite(self.alias.get(name, name), *args)


def _tie(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Checkpoints that lack an output head another input stores read it from their one embedding
    of the same shape (tied embeddings saved once)."""
    heads = {n: c.meta(n).shape for c in checkpoints for n in c.names() if _HEAD.search(n)}
    out = []
    for c in checkpoints:
        names = set(c.names())
        embeds = [n for n in names if _EMBED.search(n)]
        alias = {
            h: embeds[0]
            for h, shape in heads.items()
            if h not in names and len(embeds) == 1 and c.meta(embeds[0]).shape[1:] == shape[1:]
        }
        out.append(_Aliased(c, alias) if alias else c)
    return out


def _align(
    checkpoints: list[Checkpoint], labels: list[str]
) -> tuple[list[str], dict[str, list], dict[str, int]]:
    """Names present with the same shape everywhere, why the others were skipped, and the rows
    compared of resized vocabularies (embedding / head whose row counts differ)."""
    base, others = checkpoints[0], checkpoints[1:]
    base_names = set(base.names())
    present = {id(c): set(c.names()) | set(getattr(c, "alias", {})) for c in checkpoints}

    def _has(c, name: str) -> bool:  # stored, or read from the tied embedding
        return name in present[id(c)]

    heads_only_elsewhere = [
        n for c in others for n in c.names() if n not in base_names and _has(base, n) and _HEAD.search(n)
    ]
    skipped: dict[str, list] = {
        "only_base": [],
        "only_target": [],
        "shape_mismatch": [],
        "not_numeric": [],
        "empty": [],
        "resized": [],
    }
    common, shared_rows = [], {}
    for name in list(base.names()) + list(dict.fromkeys(heads_only_elsewhere)):
        missing = [labels[i + 1] for i, c in enumerate(others) if not _has(c, name)]
        if missing:
            skipped["only_base"].append(name if len(others) == 1 else {"name": name, "missing_in": missing})
            continue
        shapes = [c.meta(name).shape for c in checkpoints]
        if (
            len(set(shapes)) > 1
            and _VOCAB.search(name)
            and len({s[1:] for s in shapes}) == 1
            and len(shapes[0]) == 2
        ):
            rows = min(s[0] for s in shapes)
            skipped["resized"].append(
                {
                    "name": name,
                    "shapes": [list(s) for s in shapes],
                    "compared_rows": rows,
                    "extra_rows": [s[0] - rows for s in shapes],
                    "note": f"rows 0..{rows - 1} compared; the rows past {rows} exist only in some inputs",
                }
            )
            shared_rows[name] = rows
            shapes = [shapes[0]]
        if len(set(shapes)) > 1:
            skipped["shape_mismatch"].append({"name": name, "shapes": [list(s) for s in shapes]})
            continue
        if any(c.meta(name).dtype in ("U16", "U32", "U64") for c in checkpoints):
            skipped["not_numeric"].append(name)
            continue
        if 0 in shapes[0]:  # zero-size (valid safetensors): no weight to compare
            skipped["empty"].append(name)
            continue
        common.append(name)
    for i, c in enumerate(others):
        for name in c.names():
            if name not in base_names and not _has(base, name):
                skipped["only_target"].append(
                    name if len(others) == 1 else {"name": name, "only_in": labels[i + 1]}
                )
    if not common:
        empty = f" ({len(skipped['empty'])} shared tensors are empty)" if skipped["empty"] else ""
        raise InputError(
            labels[1] if len(labels) == 2 else labels[0],
            f"no tensor in common with the base (same name and shape){empty}: nothing to compare",
        )
    kept = {k: v for k, v in skipped.items() if v or k not in ("not_numeric", "empty", "resized")}
    return common, kept, shared_rows


def warnings_of(tensors: list[dict], labels: list[str]) -> list[dict]:
    """Things that make the counts mean less than they seem, from the per-matrix rows: inputs
    stored in different dtypes (a cast alone changes most weights) and tied heads read from the
    embedding. Each is {"code", "message"}."""
    out, casts, tied = [], {}, {}
    for t in tensors:
        if t.get("dtypes"):
            key = tuple(t["dtypes"])
            casts.setdefault(key, set()).add(t["source"])
        if t.get("tied_to"):
            tied[t["source"]] = t["tied_to"]
    for dtypes, names in casts.items():
        pairs = ", ".join(f"{label} {d}" for label, d in zip(labels, dtypes))
        out.append(
            {
                "code": "dtype_change",
                "message": f"{len(names)} tensors are stored in different dtypes ({pairs}): "
                f"rounding from the cast alone counts as change",
            }
        )
    for head, embed in tied.items():
        out.append(
            {
                "code": "tied_embedding",
                "message": f"{head} is not stored in every input (tied embeddings): "
                f"compared against {embed} where it is missing",
            }
        )
    return out


def as_matrix(x, transpose: bool):
    """A NumPy array or torch tensor as a 2-D (rows, cols) view: scalars (1, 1), vectors (n, 1),
    higher ranks (first dim, rest); transposed for Conv1D-style weights."""
    if x.ndim == 0:
        x = x.reshape(1, 1)
    elif x.ndim == 1:
        x = x.reshape(-1, 1)
    elif x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    return x.T if transpose else x


def part_matrix(x, part: Part):
    """The 2-D view one part reads: the leading index of a stacked tensor, transposed, strided rows."""
    if part.index is not None:
        x = x[part.index]
    x = as_matrix(x, part.transpose)
    if part.stride:
        x = x[part.stride[0] :: part.stride[1]]
    return x


def row_chunks(segments, budget_rows: int, grid_edges: list[int]) -> Iterator[tuple[int, int, int, int]]:
    """(part row, grid row, source start, source stop): chunks within one segment and one grid row."""
    part_row = 0
    for start, stop in segments:
        row = start
        while row < stop:
            at = part_row + row - start
            grid_row = bisect.bisect_right(grid_edges, at) - 1
            end = min(stop, row + budget_rows, start + grid_edges[grid_row + 1] - part_row)
            yield at, grid_row, row, end
            row = end
        part_row += stop - start


@dataclass
class _Stream:
    checkpoints: list[Checkpoint]
    names: list[str]
    family: str
    layout: Layout
    device: str
    fused: bool  # stream NumPy arrays to the one-pass CPU kernel where the dtype allows
    chunk_elements: int | None
    progress: Progress | None
    skipped: dict[str, list]
    shared_rows: dict[str, int] = field(default_factory=dict)  # resized vocabulary: rows compared
    notes: list[str] = field(default_factory=list)  # the readers' notes (trainer state left out, ...)

    def parts(self, make, inspect=None) -> Iterator[tuple[Part, list[int], str, dict]]:
        """For every matrix: (part, its 2-D shape, stored dtype, accumulated result).

        make(part, rows, cols, is_2d, numpy) builds the accumulator; numpy says whether chunks
        come as NumPy arrays (fused kernel) or torch tensors. inspect(mats, segments, result), when
        given, sees every 2-D part's whole matrices (base first) while they are in memory; what it
        returns is the result's "geometry".
        """
        total = sum(c.meta(n).nbytes for c in self.checkpoints for n in self.names)
        done = 0
        if self.progress:
            self.progress(0, total, self.names[0] if self.names else "")
        stager = CudaStager(self.device) if self.device.startswith("cuda") else None

        def load(name: str) -> tuple[bool, list]:  # on the prefetch thread, one tensor ahead
            numpy = (
                self.fused
                and all(c.meta(name).dtype in fused.DTYPES for c in self.checkpoints)
                and len({c.meta(name).dtype for c in self.checkpoints}) == 1
            )
            if numpy:
                return True, [c.array(name) for c in self.checkpoints]  # pages faulted in here
            return False, [stager(c.tensor(name)) if stager else c.tensor(name) for c in self.checkpoints]

        for name, (numpy, tensors) in prefetched(self.names, load):
            meta = self.checkpoints[0].meta(name)
            if stager:
                tensors = [stager.ready(t) for t in tensors]
            for part in self.cut(name, meta.shape):
                mats = [part_matrix(t, part) for t in tensors]
                full_rows, cols = mats[0].shape
                segments = part.segments or ((0, full_rows),)
                rows = sum(e - s for s, e in segments)
                is_2d = len(meta.shape) - (part.index is not None) == 2
                # the torch kernel needs each chunk inside one update-map row; the fused one does not
                grid_edges = bin_bounds(rows, min(MAP_CELLS, rows)) if is_2d and not numpy else [0, rows]
                acc = make(part, rows, cols, is_2d, numpy)
                chunk = self.chunk_elements or (
                    1 << 20 if numpy else 1 << 24 if self.device.startswith("cuda") else 1 << 18
                )
                budget_rows = max(1, chunk // max(cols, 1))
                for at, grid_row, start, stop in row_chunks(segments, budget_rows, grid_edges):
                    acc.add(mats[0][start:stop], [m[start:stop] for m in mats[1:]], at, grid_row)
                result = acc.result()
                if not _finite(result):
                    self.refuse_nonfinite(name)
                if inspect is not None and is_2d:
                    result["geometry"] = inspect(mats, segments, result)
                yield (
                    part,
                    [rows]
                    if part.index is not None and len(meta.shape) == 2  # a stacked vector (expert bias)
                    else [rows, cols]
                    if (part.segments or part.transpose or part.stride)
                    else list(meta.shape[part.index is not None :]),
                    meta.stored or meta.dtype,
                    result,
                )
            del tensors
            for c in self.checkpoints:
                c.release(name)
                done += c.meta(name).nbytes
            if self.progress:
                self.progress(done, total, name)

    def provenance(self, name: str) -> dict:
        """Row fields for inputs that differ in how they store a tensor: `dtypes` (one per input,
        base first) when they differ, `tied_to` when some input reads it from its embedding."""
        out = {}
        dtypes = [(m := c.meta(name)).stored or m.dtype for c in self.checkpoints]  # fp8 read as F64: fp8
        if len(set(dtypes)) > 1:
            out["dtypes"] = dtypes
        tied = [c.alias[name] for c in self.checkpoints if name in getattr(c, "alias", {})]
        if tied:
            out["tied_to"] = tied[0]
        return out

    def cut(self, name: str, shape: tuple[int, ...]) -> list[Part]:
        """The parts of one aligned tensor; a resized vocabulary keeps only the rows all inputs share."""
        parts = parts_of(name, shape, self.family, self.layout)
        shared = self.shared_rows.get(name)
        if shared is None:
            return parts
        return [dataclasses.replace(p, segments=((0, shared),)) for p in parts]

    def refuse_nonfinite(self, name: str) -> None:
        """Σ Δ² or Σ b² came out NaN/Inf: name the checkpoint whose tensor holds NaN or Inf values."""
        for c in self.checkpoints:
            nan, inf = c.nonfinite(name)
            if nan or inf:
                raise InputError(
                    c.path,
                    f"tensor {name!r} holds {nan} NaN and {inf} infinite values; "
                    f"weight changes are only defined for finite weights",
                )
        raise InputError(self.checkpoints[0].path, f"tensor {name!r}: weight changes overflow float64")


def _finite(result: dict) -> bool:
    """Σ Δ² and Σ b² are finite exactly when every b and Δ are: a free NaN/Inf check."""
    sq_delta = result["sq_delta"]
    return math.isfinite(sum(sq_delta) if isinstance(sq_delta, list) else sq_delta) and math.isfinite(
        result["sq_base"]
    )


def _open_all(paths: list[str], opts: Options, fused_ok: bool = False) -> tuple[list[Checkpoint], _Stream]:
    checkpoints = _tie(open_checkpoints(paths))  # a LoRA adapter after the base is merged onto it
    names, skipped, shared_rows = _align(checkpoints, [str(p) for p in paths])
    if opts.names is not None:
        wanted, stored = set(opts.names), set(checkpoints[0].names())
        names = [n for n in names if n in wanted or (opts.unstored and n not in stored)]
    config = next((c.config for c in checkpoints if c.config), {})
    device = opts.resolved_device()
    return checkpoints, _Stream(
        checkpoints,
        names,
        detect_family(config, names),
        Layout.from_config(config),
        device,
        fused_ok and opts.use_fused(device),
        opts.chunk_elements,
        opts.progress,
        skipped,
        shared_rows,
        [note for c in checkpoints for note in getattr(c, "notes", [])],
    )


def _part_fields(part: Part, shape: list[int], dtype: str) -> dict:
    return dict(
        name=part.name,
        source=part.source,
        layer=part.layer,
        block=part.block,
        matrix=part.matrix,
        expert=part.expert,
        shape=shape,
        numel=math.prod(shape),
        dtype=dtype,
    )


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _group(rows: list[dict], key: str, taus: list[float]) -> list[dict]:
    """Parameter-weighted totals (sums of counts) per block or per layer."""
    groups: dict = {}
    for r in rows:
        g = groups.setdefault(r[key], {key: r[key], "numel": 0, "changed": [0] * len(taus)})
        g["numel"] += r["numel"]
        g["changed"] = [x + c["count"] for x, c in zip(g["changed"], r["changed"])]
    vocab = {"block": BLOCKS, "matrix": MATRIX_TYPES}.get(key)
    order = (
        (lambda g: (g[key] is None, g[key] or 0))
        if vocab is None
        else (lambda g: vocab.index(g[key]) if g[key] in vocab else 99)
    )
    return [
        {**g, "changed": [{"tau": t, "count": c} for t, c in zip(taus, g["changed"])]}
        for g in sorted(groups.values(), key=order)
    ]


# ---------------------------------------------------------------------------------------------
# pair
# ---------------------------------------------------------------------------------------------
def analyze_pair(base: str, target: str, opts: Options) -> AnalysisResult:
    checkpoints, stream = _open_all([base, target], opts, fused_ok=True)
    taus = opts.taus
    mode = "changed_rel" if opts.relative else "changed_abs"

    def make(part, rows, cols, is_2d, numpy):
        args = (rows, cols, taus, opts.relative, is_2d, opts.rank, part.heads, part.matrix in ("q", "k", "v"))
        meta = checkpoints[0].meta(part.source)
        ulp = precision.ulp_format(meta.stored or meta.dtype)  # the base's stored grid
        if numpy:
            return fused.FusedPairAccumulator(*args, ulp=ulp)
        import torch

        from deltalens.worker.kernels import PairAccumulator

        return PairAccumulator(*args, torch.device(stream.device), ulp=ulp)

    details = []
    inspect = (
        (lambda mats, seg, r: geometry.of_part(mats, seg, taus[0], opts.relative, r))
        if opts.geometry
        else None
    )
    for part, shape, dtype, r in stream.parts(make, inspect):
        row = _part_fields(part, shape, dtype) | stream.provenance(part.source)
        row["changed"] = [{"tau": t, "count": c} for t, c in zip(taus, r[mode])]
        row["sparsity"] = [1 - c / row["numel"] if row["numel"] else None for c in r[mode]]
        row.update(
            norm_delta=r["norm_delta"],
            norm_base=r["norm_base"],
            relative_change=_ratio(r["norm_delta"], r["norm_base"]),
            max_abs_delta=r["max_abs_delta"],
            mean_abs_delta=_ratio(r["sum_abs_delta"], row["numel"]),
        )
        for k in ("rank", "full_rank", "rank_pct", "effective_rank", "stable_rank", "rank90", "rank99"):
            row[k] = r.get(k)
        row.update(precision.row_fields(r, dtype))
        row["geometry"] = r.pop("geometry", None)
        details.append({"run": 0, "name": part.name, "row": row, **r})
    result = pair_result([base, target], opts, details, Made.by(stream))
    adapters.annotate(result.document, checkpoints, opts.taus, opts.relative)  # exact ΔW of LoRA inputs
    return result


@dataclass(frozen=True)
class Made:
    """How a pass ran, which a result builder takes besides the details (a fan-out's part 0 keeps it)."""

    skipped: dict
    family: str
    device: str
    notes: list[str] = field(default_factory=list)

    @classmethod
    def by(cls, stream: _Stream) -> Made:
        return cls(stream.skipped, stream.family, str(stream.device), list(stream.notes))

    def result(
        self, kind: str, opts: Options, details: list[dict], labels: list[str], head: dict, figures: dict
    ) -> AnalysisResult:
        """The document: head (inputs), mode, family, figures, then the rows and what the pass noted."""
        tensors = [d["row"] for d in details]
        document = {
            "kind": kind,
            **head,
            "mode": "relative" if opts.relative else "absolute",
            "family": self.family,
            **figures,
            "tensors": tensors,
            "skipped": self.skipped,
            "warnings": warnings_of(tensors, ["base", *labels]),
            "notes": list(self.notes),
        }
        return AnalysisResult(kind, document, details, self.family, self.device)


def pair_result(paths: list[str], opts: Options, details: list[dict], made: Made) -> AnalysisResult:
    """The pair document from its per-matrix details — of one pass, or of a fanned-out analysis's
    parts concatenated in tensor order (the same sums in the same order: identical numbers)."""
    (base, target), taus, tensors = paths, opts.taus, [d["row"] for d in details]
    sq_delta, sq_base = sum(d["sq_delta"] for d in details), sum(d["sq_base"] for d in details)
    numel = sum(t["numel"] for t in tensors)
    changed = [sum(t["changed"][i]["count"] for t in tensors) for i in range(len(taus))]
    ranked = [t["rank_pct"] for t in tensors if t["rank_pct"] is not None]
    summary = {
        "numel": numel,
        "changed": [{"tau": t, "count": c} for t, c in zip(taus, changed)],
        "sparsity": [{"tau": t, "value": 1 - c / numel if numel else None} for t, c in zip(taus, changed)],
        "similarity": {
            "tau": taus[0],
            "equal_share": 1 - changed[0] / numel if numel else None,
            "relative_l2": _ratio(math.sqrt(sq_delta), math.sqrt(sq_base)),
        },
        "mean_rank_pct": sum(ranked) / len(ranked) if ranked else None,
        "min_rank_pct": min(ranked) if ranked else None,
        "by_block": _group(tensors, "block", taus),
        "by_matrix": _group(tensors, "matrix", taus),
        "by_layer": _group(tensors, "layer", taus),
        "precision": precision.summary(tensors),
        "geometry": geometry.summary(tensors),
    }
    head = {"base": str(base), "target": str(target), "taus": taus}
    return made.result("pair", opts, details, ["target"], head, {"summary": summary})


# ---------------------------------------------------------------------------------------------
# series and overlap: masks of several checkpoints against one base
# ---------------------------------------------------------------------------------------------
def _mask_stream(paths: list[str], opts: Options, series: bool):
    checkpoints, stream = _open_all(paths, opts, fused_ok=fused_masks.AVAILABLE)
    runs = len(paths) - 1
    tau = opts.taus[0]

    def make(part, rows, cols, is_2d, numpy):
        if numpy:
            return fused_masks.FusedMaskAccumulator(runs, tau, opts.relative, series)
        import torch

        from deltalens.worker.kernels import MaskAccumulator

        return MaskAccumulator(runs, tau, opts.relative, series, torch.device(stream.device))

    return stream, tau, stream.parts(make)


# The raw accumulator figures a mask analysis keeps per matrix — what its totals are summed from —
# each with its value for no weights at all (the shape, given the number of runs).
TOTALED: dict[str, dict[str, Callable[[int], object]]] = {
    "series": {
        "steps": lambda n: [[0, 0]] * n,  # per step: |M_k|, |M_k ∧ ¬M_final|
        "union": lambda n: [0, 0],  # |∪M|, |∪M ∧ ¬M_final|
        "sq_delta": lambda n: [0.0] * n,
        "sq_base": lambda n: 0.0,
        "first": lambda n: [[0] * (n + 1)] * 2,  # [reverted, kept] x first step changed
    },
    "overlap": {"patterns": lambda n: [0] * (1 << n)},  # weights per membership code
}


def _summed(values: list, zero):
    """Element-wise sum of numbers or equally shaped nested lists, in the order given (from `zero`)."""
    if isinstance(zero, list):
        return [_summed([v[i] for v in values], z) for i, z in enumerate(zero)]
    return sum(values, zero)


def _totals(kind: str, details: list[dict], runs: int) -> dict:
    return {key: _summed([d[key] for d in details], zero(runs)) for key, zero in TOTALED[kind].items()}


def _mask_details(
    kind: str, paths: list[str], opts: Options, figures: Callable[[dict, int], dict]
) -> tuple[list[dict], _Stream]:
    """Stream a series or overlap: per matrix its row (part fields, provenance, `figures(result,
    numel)`) and the raw figures its totals are summed from (JSON-safe: a fan-out's parts carry them)."""
    stream, _, parts = _mask_stream(paths, opts, series=kind == "series")
    details = []
    for part, shape, dtype, r in parts:
        row = _part_fields(part, shape, dtype) | stream.provenance(part.source)
        row.update(figures(r, row["numel"]))
        details.append({"run": 0, "name": part.name, "row": row} | {k: r[k] for k in TOTALED[kind]})
    return details, stream


def _series_figures(r: dict, numel: int, labels: list[str]) -> dict:
    """Steps and categories of one matrix's raw series figures, or of their totals."""
    steps, union, sq_delta = r["steps"], r["union"], r["sq_delta"]
    return {
        "steps": [
            {
                "checkpoint": label,
                "changed": c,
                "outside_final": o,
                "transient_fraction": _ratio(o, c),
                "relative_l2": _ratio(math.sqrt(d), math.sqrt(r["sq_base"])),
                **extra,
            }
            for label, (c, o), d, extra in zip(
                labels, steps, sq_delta, mask_stats.step_figures(r["first"], sq_delta)
            )
        ],
        "categories": {"consistent": steps[-1][0], "transient": union[1], "untouched": numel - union[0]},
    }


def analyze_series(base: str, checkpoints: list[str], opts: Options) -> AnalysisResult:
    if not checkpoints:
        raise InputError(base, "a series needs at least one checkpoint after the base")
    paths, labels = [base, *checkpoints], [str(c) for c in checkpoints]
    details, stream = _mask_details("series", paths, opts, lambda r, n: _series_figures(r, n, labels))
    return series_result(paths, opts, details, Made.by(stream))


def series_result(paths: list[str], opts: Options, details: list[dict], made: Made) -> AnalysisResult:
    """The series document from its per-matrix details (one pass, or a fan-out's parts in tensor order)."""
    labels, tensors = [str(c) for c in paths[1:]], [d["row"] for d in details]
    numel = sum(t["numel"] for t in tensors)
    figures = {
        "numel": numel,
        **_series_figures(_totals("series", details, len(labels)), numel, labels),
        "transient_heatmap": mask_stats.transient_heatmap(tensors),
    }
    head = {"base": str(paths[0]), "checkpoints": labels, "tau": opts.taus[0]}
    return made.result("series", opts, details, labels, head, figures)


def _overlap_figures(patterns: list[int], runs: int, numel: int) -> dict:
    changed = [sum(n for code, n in enumerate(patterns) if code >> k & 1) for k in range(runs)]
    pairs = []
    for a in range(runs):
        for b in range(a + 1, runs):
            both = sum(n for code, n in enumerate(patterns) if code >> a & 1 and code >> b & 1)
            either = changed[a] + changed[b] - both
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "both": both,
                    "o1": _ratio(both, changed[a]),
                    "o2": _ratio(both, changed[b]),
                    "baseline1": _ratio(changed[b], numel),
                    "baseline2": _ratio(changed[a], numel),
                    "jaccard": _ratio(both, either),
                }
            )
    out = {"numel": numel, "changed": changed, "pairs": pairs}
    if runs <= 3:
        out["venn"] = {
            "".join("1" if code >> k & 1 else "0" for k in range(runs)): n
            for code, n in enumerate(patterns)
            if code
        }
    return out


def analyze_overlap(base: str, runs: list[str], opts: Options) -> AnalysisResult:
    if len(runs) < 2:
        raise InputError(base, "an overlap needs at least two runs after the base")
    if len(runs) > MAX_OVERLAP_RUNS:
        raise InputError(runs[MAX_OVERLAP_RUNS], f"an overlap compares at most {MAX_OVERLAP_RUNS} runs")

    def figures(r: dict, numel: int) -> dict:
        row = _overlap_figures(r["patterns"], len(runs), numel)
        row["pairs"] = mask_stats.tensor_pairs(row["pairs"], row["changed"], numel, r["same_sign"])
        return row

    paths = [base, *runs]
    details, stream = _mask_details("overlap", paths, opts, figures)
    return overlap_result(paths, opts, details, Made.by(stream))


def overlap_result(paths: list[str], opts: Options, details: list[dict], made: Made) -> AnalysisResult:
    """The overlap document from its per-matrix details (one pass, or a fan-out's parts in tensor order)."""
    labels, tensors = [str(r) for r in paths[1:]], [d["row"] for d in details]
    runs = len(labels)
    totals = _totals("overlap", details, runs)["patterns"]
    numel = sum(t["numel"] for t in tensors)
    summary = _overlap_figures(totals, runs, numel)
    stats = mask_stats.summed_pairs(tensors, summary["changed"], numel)
    summary["pairs"] = [p | s for p, s in zip(summary["pairs"], stats)]
    summary["upset"] = mask_stats.upset(totals, runs)
    summary.update({f"by_{key}": mask_stats.grouped(tensors, key, runs) for key in mask_stats.GROUP_KEYS})
    head = {"base": str(paths[0]), "runs": labels, "tau": opts.taus[0]}
    return made.result("overlap", opts, details, labels, head, {"summary": summary})


ANALYSES = {"pair": analyze_pair, "series": analyze_series, "overlap": analyze_overlap}
# kind -> its document from per-matrix details: what the merge of a fanned-out analysis calls
RESULTS = {"pair": pair_result, "series": series_result, "overlap": overlap_result}


def run_analysis(kind: str, paths: list[str], opts: Options) -> AnalysisResult:
    """Entry point shared by the CLI and the Celery task: paths in the CLI's order."""
    if kind == "pair":
        if len(paths) != 2:
            raise InputError(paths[0] if paths else "pair", "a pair analysis takes exactly BASE and TARGET")
        return analyze_pair(paths[0], paths[1], opts)
    return ANALYSES[kind](paths[0], list(paths[1:]), opts)
