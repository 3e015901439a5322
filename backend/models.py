"""Every JSON shape the API reads or answers with: the pydantic request and response models, in one place.

The result document (`GET /api/analyses/{id}/result`) is exactly what the CLI's `--json` writes; its
models name the fields of ARCHITECTURE.md's "CLI contract" and allow extra ones, so nothing is dropped.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
    model_validator,
)

from deltalens.worker.contract import DEFAULT_TAU, MAX_TITLE, Kind, Mode, Status, check_tau

Tau = Annotated[float, Field(ge=0, description="tolerance τ (finite, >= 0)"), AfterValidator(check_tau)]
FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"  # an uploaded file's name (checked by Uploads)
# the catalog keeps naive UTC times; the API says so (RFC 3339, "...Z")
UtcTime = Annotated[datetime, AfterValidator(lambda t: t if t.tzinfo else t.replace(tzinfo=UTC))]
Layer = Annotated[int | None, Field(description="layer index; null for tensors outside the layers")]


class Open(BaseModel):
    """A part of the result document: the fields named here, and any others the engine adds."""

    model_config = ConfigDict(extra="allow")


# --- meta, errors ------------------------------------------------------------------------------
class Health(BaseModel):
    status: str = Field(description="'ok' while the API serves")
    dashboard: bool = Field(description="whether this installation carries the built dashboard")


class DemoStatus(BaseModel):
    """`deltalens up --demo DIR`: how the training of the demo models stands (DIR/status.json)."""

    state: Literal["none", "starting", "training", "done", "failed"] = Field(
        description="none: no demo is served; starting: its trainer has not reported yet"
    )
    stage: str | None = Field(None, description="the stage training now (pretrain, SFT, GRPO seed 1, ...)")
    index: int = Field(0, description="its position, 1-based")
    total: int = Field(0, description="how many stages there are")
    step: int = Field(0, description="steps done in this stage")
    steps: int = Field(0, description="steps of this stage")
    figure: str = Field("", description="the figure it reached so far, e.g. 'loss 0.412'")
    eta_s: float | None = Field(None, description="seconds until every stage is trained (estimate)")
    finished: list[str] = Field([], description="the stages trained (their folders in DIR)")


class ErrorOut(BaseModel):
    """The body of every error response."""

    code: str = Field(
        description="machine-readable reason: not_found, invalid_request, wrong_kind, not_ready, ..."
    )
    message: str = Field(description="what went wrong, for people")


class Created(BaseModel):
    id: str = Field(description="id of what was created")


class Redelivered(BaseModel):
    ids: list[str] = Field(description="analyses whose task was sent to the workers again")
    masks: list[str] = Field(description="mask exports sent again")


# --- checkpoints and uploads ---------------------------------------------------------------------
class PathIn(BaseModel):
    """Exactly one of `path` (registered at once: 201) or `hub` (downloaded in the background: 202)."""

    path: str | None = Field(
        None,
        description="a checkpoint folder or .safetensors file under DELTALENS_ALLOWED_ROOTS",
        max_length=4096,
        pattern=r"^[^\x00]*$",
    )
    hub: str | None = Field(
        None,
        description="a model on the Hugging Face hub: org/name[@revision] (branch, tag or 40-hex commit)",
        max_length=400,
        examples=["org/name@main"],
    )

    @model_validator(mode="after")
    def _one(self) -> PathIn:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path or hub")
        return self


class DownloadOut(BaseModel):
    """A hub download (`POST /api/checkpoints {"hub"}`), followed with `GET /api/downloads/{id}`."""

    id: str
    hub: str = Field(description="org/name")
    revision: str = Field(description="branch, tag or commit asked for")
    state: Literal["queued", "downloading", "done", "failed"]
    done_bytes: int
    total_bytes: int = Field(description="grows once a sharded checkpoint's index is read")
    files_done: int
    files_total: int
    checkpoint: str | None = Field(description="the registered checkpoint's id, once done")
    error: ErrorOut | None = Field(description="why it failed")


class FileIn(BaseModel):
    name: str = Field(
        json_schema_extra={"pattern": FILE_NAME},  # checked by Uploads (422 invalid_name), not here
        description=".safetensors weights or .json metadata",
    )
    size: int = Field(ge=0, description="bytes")


class UploadIn(BaseModel):
    name: str = Field("checkpoint", max_length=200)
    files: list[FileIn] = Field(max_length=10_000)


class UploadFileOut(FileIn):
    received: int = Field(description="bytes of the file's contiguous prefix the server holds")


class UploadOut(BaseModel):
    id: str
    name: str
    files: list[UploadFileOut]
    complete: bool = Field(description="every byte of every file is in")


class ChunkOut(BaseModel):
    name: str
    received: int = Field(description="bytes of the file's contiguous prefix the server holds")
    size: int


class CheckpointFile(BaseModel):
    name: str
    size: int = Field(description="bytes")
    sha256: str | None = Field(None, description="uploaded files only: their content's sha256 (blob name)")


class CheckpointOut(BaseModel):
    id: str
    name: str
    source: Literal["upload", "path", "hub"] = Field(
        description="uploaded, registered from a server path, or downloaded from the Hugging Face hub"
    )
    path: str = Field(description="where the checkpoint lies on the server")
    files: list[CheckpointFile]
    bytes: int = Field(description="total size of its files")
    sha256: str | None = Field(description="uploads only: sha256 of the sorted (file name, sha256) list")
    created_at: UtcTime


# --- short links -------------------------------------------------------------------------------
class LinkIn(BaseModel):
    url: str = Field(
        max_length=4000, description="a dashboard path with its query, e.g. /analyses/ab12?tau=1e-4"
    )


class LinkOut(BaseModel):
    code: str
    url: str = Field(description="the view's path and query")
    short_url: str = Field(
        description="the link that redirects to the view: DELTALENS_PUBLIC_URL + /s/<code>, or the path "
        "/s/<code> when no public URL is configured"
    )


# --- analyses ----------------------------------------------------------------------------------
# control, format (bidi overrides, zero-width) and line/paragraph separators: not in one line of text
NOT_PLAIN = {"Cc", "Cf", "Zl", "Zp"}


def _plain_text(title: str) -> str:
    if any(unicodedata.category(c) in NOT_PLAIN for c in title):
        raise ValueError("a title is one line of text: no control, format or line-separator characters")
    return title


# an analysis' title: one line of plain text (the dashboard shows it as text, never as HTML)
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TITLE),
    AfterValidator(_plain_text),
    Field(description=f"one line of text, 1–{MAX_TITLE} characters"),
]


class AnalysisIn(BaseModel):
    kind: Kind
    title: Title | None = Field(
        None, description='what the list calls it; default: from the checkpoint names ("target vs base")'
    )
    checkpoints: list[str] = Field(description="checkpoint ids in the CLI's order: base first")
    taus: list[Tau] = Field([DEFAULT_TAU], max_length=16)
    relative: bool = Field(False, description="count |Δ| > τ·|base| instead of |Δ| > τ")
    rank: bool = Field(True, description="compute update ranks (SVD) of 2-D tensors")
    geometry: bool = Field(
        True, description="pair: principal geometry of ΔW against the base and where the update mask falls"
    )


class AnalysisRename(BaseModel):
    title: Title


class Headline(BaseModel):
    """The one figure the analyses list shows for a finished analysis."""

    metric: Literal["sparsity", "transient_share", "overlap_o1"] = Field(
        description="pair: model sparsity at the default τ; series: share of weights moved and then "
        "reverted; overlap: o1 of the first two runs"
    )
    value: float | None
    baseline: float | None = Field(None, description="overlap: o1 of a random mask of the same size")
    tau: float = Field(description="the τ the figure is at (pair: the histogram edge nearest the default)")
    relative: bool = Field(description="|Δ| > τ·|base| (relative mode) instead of |Δ| > τ")


class ServerConfig(BaseModel):
    """What the dashboard's New page needs to know about this server before an upload."""

    allow_pickle: bool = Field(
        description="pickled weights (.bin, .pt, .pth) are accepted (DELTALENS_ALLOW_PICKLE)"
    )
    max_upload_bytes: int = Field(description="largest single file an upload may declare")
    max_title: int = Field(description="longest analysis title, in characters")


class AnalysisOut(BaseModel):
    id: str
    kind: Kind
    title: str
    headline: Headline | None = Field(description="the list's headline figure, once done")
    status: Status
    progress: float = Field(description="0 … 1")
    error: ErrorOut | None = Field(description="why it failed, when it did")
    checkpoints: list[str]
    taus: list[float]
    relative: bool
    created_at: str
    updated_at: str
    detail: dict[str, Any] | None = Field(description="the worker's latest progress report")


# --- the result document (what `--json` writes) -------------------------------------------------
class TauCount(BaseModel):
    tau: float
    count: int = Field(description="weights with |Δ| > τ (or > τ·|b| in relative mode)")


class TauValue(BaseModel):
    tau: float
    value: float | None


class SkippedTensor(Open):
    name: str


Skipped = Annotated[
    dict[str, list[str | SkippedTensor]],
    Field(
        description="tensors left out, by reason: only_base, only_target, shape_mismatch, not_numeric, empty"
    ),
]


class Notice(BaseModel):
    code: str = Field(description="dtype_change | tied_embedding | ...")
    message: str


class AdapterModule(BaseModel):
    """The exact ΔW = scale·B·A of one adapted module (before rounding to the base dtype)."""

    name: str
    r: int
    alpha: float
    scale: float = Field(description="α/r, or α/√r with rsLoRA")
    numel: int
    changed: list[TauCount] = Field(description="entries of the exact ΔW above τ")
    norm_delta: float
    rank: int | None = None
    full_rank: int | None = None
    singular_values: list[float] | None = None


class AdapterFigures(BaseModel):
    input: int = Field(description="which input is the adapter (1 = the target)")
    adapter: str
    r: int
    alpha: float
    use_rslora: bool
    replaced: list[str] = Field(description="base tensors the adapter saves whole (modules_to_save)")
    modules: list[AdapterModule]


class TensorRow(Open):
    """One matrix (a fused tensor appears as its split parts) in the result document."""

    name: str
    source: str = Field(description="the stored tensor it is (a part of)")
    layer: Layer
    block: str
    matrix: str = Field(
        description="canonical matrix type: q k v o gate up down embed lm_head norm bias other"
    )
    expert: int | None
    shape: list[int]
    numel: int
    dtype: str


class RankFigures(BaseModel):
    """The singular-spectrum figures of a 2-D Δ (null for other tensors or with --no-rank)."""

    rank: int | None
    full_rank: int | None
    rank_pct: float | None
    effective_rank: float | None
    stable_rank: float | None
    rank90: int | None
    rank99: int | None


class PairTensor(TensorRow, RankFigures):
    changed: list[TauCount]
    sparsity: list[float | None]
    norm_delta: float | None
    norm_base: float | None
    relative_change: float | None = Field(description="‖Δ‖₂ / ‖base‖₂")
    max_abs_delta: float | None
    mean_abs_delta: float | None


class Group(Open):
    """Parameter-weighted totals of one block, matrix type or layer (the group's key is its own field)."""

    numel: int
    changed: list[TauCount]


class Similarity(Open):
    tau: float
    equal_share: float | None = Field(description="share of weights equal within τ")
    relative_l2: float | None = Field(description="‖target − base‖₂ / ‖base‖₂")


class UlpCell(BaseModel):
    layer: Layer
    matrix: str
    numel: int = Field(description="weights with a ULP grid (float dtypes, not fp8 dequantized)")
    one_ulp: int = Field(description="weights moved by more than 0 and at most 1 ULP of the base's dtype")
    one_ulp_share: float | None = Field(description="one_ulp / numel")
    one_ulp_of_changed: float | None = Field(description="one_ulp / weights whose stored value changed")


class PrecisionFigures(Open):
    """|Δ| in ULPs of the base's stored dtype, summed over the matrices that have a ULP grid."""

    ulp_edges: list[float] = Field(description="bins: [u = 0], (0, E0], (E0, E1], …, (E_last, +inf)")
    ulp_hist: list[int]
    numel: int
    one_ulp: int
    one_ulp_share: float | None
    one_ulp_of_changed: float | None
    dtypes: list[str] = Field(description="the base's stored dtypes counted")
    visibility_floor: dict[str, float] = Field(description="per dtype: no stored change is below this · |b|")
    by_layer_matrix: list[UlpCell]
    unknowable: str = Field(description="what stored checkpoints cannot show")


class PairFigures(Open):
    numel: int
    changed: list[TauCount]
    sparsity: list[TauValue]
    similarity: Similarity
    mean_rank_pct: float | None
    min_rank_pct: float | None
    by_block: list[Group]
    by_matrix: list[Group]
    by_layer: list[Group]
    precision: PrecisionFigures | None = Field(None, description="ULP histogram and one-ULP share")


class SeriesStep(Open):
    checkpoint: str
    changed: int = Field(description="|M_t|")
    outside_final: int = Field(description="|M_t ∧ ¬M_T|")
    transient_fraction: float | None = Field(description="|M_t ∧ ¬M_T| / |M_t|")
    relative_l2: float | None = Field(description="‖θ_t − θ0‖₂ / ‖θ0‖₂")
    norm_delta: float | None = Field(None, description="‖θ_t − θ0‖₂ (absolute)")
    first_changed: int | None = Field(None, description="weights first differing from the base at this step")
    kept: int | None = Field(None, description="of first_changed: still changed at the final checkpoint")
    reverted: int | None = Field(None, description="of first_changed: unchanged at the final checkpoint")


class TransientHeatmap(BaseModel):
    """Per layer × matrix type: Σ transient / Σ weights of the cell's tensors."""

    layers: list[Layer]
    matrices: list[str]
    transient: list[list[int | None]]
    numel: list[list[int | None]]
    share: list[list[float | None]]


class SeriesCategories(Open):
    consistent: int = Field(description="|M_T|")
    transient: int = Field(description="|(∪ M_t) ∧ ¬M_T|")
    untouched: int = Field(description="N − |∪ M_t|")


class SeriesTensor(TensorRow):
    steps: list[SeriesStep]
    categories: SeriesCategories


class OverlapPair(Open):
    a: int = Field(description="run index")
    b: int = Field(description="run index")
    both: int = Field(description="|A ∧ B|")
    o1: float | None = Field(description="|A ∧ B| / |A|")
    o2: float | None = Field(description="|A ∧ B| / |B|")
    baseline1: float | None = Field(description="|B| / N: o1 of a random mask of B's size")
    baseline2: float | None = Field(description="|A| / N")
    jaccard: float | None
    baseline: float | None = Field(
        None, description="E|A ∧ B| of random masks of the same density: hypergeometric mean, Σ over tensors"
    )
    variance: float | None = Field(None, description="hypergeometric variance, Σ over tensors")
    lift: float | None = Field(None, description="both / baseline")
    z: float | None = Field(None, description="(both − baseline) / sqrt(variance)")
    same_sign: int | None = Field(None, description="of both: sign(Δ_A) = sign(Δ_B)")
    opposite_sign: int | None = Field(None, description="of both: sign(Δ_A) ≠ sign(Δ_B)")
    sign_agreement: float | None = Field(None, description="same_sign / both")
    baseline_global: float | None = Field(None, description="|A||B|/N of the totals (model / group level)")
    lift_global: float | None = Field(None, description="both / baseline_global")


class PairStats(Open):
    """A pair's overlap in a group of tensors, against the summed per-tensor random baselines."""

    a: int
    b: int
    both: int
    baseline: float
    variance: float
    lift: float | None
    z: float | None
    same_sign: int
    opposite_sign: int
    sign_agreement: float | None


class OverlapGroup(Open):
    matrix: str | None = Field(None, description="the group's matrix type (by_matrix)")
    layer: Layer = None
    numel: int
    changed: list[int] = Field(description="per run")
    pairs: list[PairStats]


class UpsetRow(Open):
    region: str = Field(description="membership bits in run order, e.g. '101'")
    runs: list[int]
    exact: int = Field(description="changed in exactly these runs (UpSet distinct mode)")
    inclusive: int = Field(description="changed in at least these runs")


class OverlapFigures(Open):
    numel: int
    changed: list[int] = Field(description="per run, weights changed")
    pairs: list[OverlapPair]
    venn: dict[str, int] | None = Field(
        None, description="for 2–3 runs: count of every Venn region, keyed by membership bits in run order"
    )
    upset: list[UpsetRow] | None = Field(None, description="every non-empty set of runs (model level)")
    by_matrix: list[OverlapGroup] | None = None
    by_layer: list[OverlapGroup] | None = None


class OverlapTensor(TensorRow, OverlapFigures):
    pass


class Reported(Open):
    """What every document says about how it was read."""

    warnings: list[Notice] = Field(
        default=[], description="what makes the counts mean less than they seem (dtype changes, ties)"
    )
    notes: list[str] = Field(default=[], description="what was read how, and what was left out")


class PairHead(Reported):
    kind: Literal["pair"]
    base: str
    target: str
    taus: list[float]
    mode: Literal["absolute", "relative"]
    family: str
    summary: PairFigures
    skipped: Skipped
    adapters: list[AdapterFigures] | None = Field(
        default=None, description="exact ΔW figures of each LoRA adapter input (absent when none)"
    )


class SeriesHead(Reported):
    kind: Literal["series"]
    base: str
    checkpoints: list[str] = Field(description="θ1 … θT, the last one final")
    tau: float
    mode: Literal["absolute", "relative"]
    family: str
    numel: int
    steps: list[SeriesStep]
    categories: SeriesCategories
    transient_heatmap: TransientHeatmap | None = None
    skipped: Skipped


class OverlapHead(Reported):
    kind: Literal["overlap"]
    base: str
    runs: list[str]
    tau: float
    mode: Literal["absolute", "relative"]
    family: str
    summary: OverlapFigures
    skipped: Skipped


class PairResult(PairHead):
    tensors: list[PairTensor]


class SeriesResult(SeriesHead):
    tensors: list[SeriesTensor]


class OverlapResult(OverlapHead):
    tensors: list[OverlapTensor]


class ResultDocument(
    RootModel[Annotated[PairResult | SeriesResult | OverlapResult, Field(discriminator="kind")]]
):
    """The object `deltalens pair|series|overlap --json` writes, told apart by `kind`."""


class PairSummary(PairHead):
    tensor_count: int = Field(description="rows in the result's `tensors`")


class SeriesSummary(SeriesHead):
    tensor_count: int = Field(description="rows in the result's `tensors`")


class OverlapSummary(OverlapHead):
    tensor_count: int = Field(description="rows in the result's `tensors`")


class ResultSummary(
    RootModel[Annotated[PairSummary | SeriesSummary | OverlapSummary, Field(discriminator="kind")]]
):
    """The result document without its `tensors`, told apart by `kind`."""


# --- read-side views ---------------------------------------------------------------------------
class Heatmap(BaseModel):
    analysis: str
    metric: str
    mode: Mode
    tau: float = Field(description="the histogram edge τ snapped to (0: stored values differ)")
    tau_requested: float
    layers: list[int | None] = Field(description="grid rows")
    matrices: list[str] = Field(description="grid columns: matrix types present, in canonical order")
    values: list[list[float | None]] = Field(description="the metric per cell; null where no tensor is")
    changed: list[list[int | None]]
    numel: list[list[int | None]]


class TensorChanged(BaseModel):
    """Per matrix, the weights changed at one τ (snapped to a histogram edge, as the heatmap)."""

    analysis: str
    mode: Mode
    tau: float = Field(description="the histogram edge τ snapped to (0: stored values differ)")
    tau_requested: float
    names: list[str] = Field(description="matrix names (fused tensors as their parts)")
    changed: list[int] = Field(description="weights with |Δ| above τ, per name")


class HeatmapCube(BaseModel):
    analysis: str
    mode: Mode
    layers: list[int | None]
    matrices: list[str]
    numel: list[list[int | None]]
    hist: list[list[list[int] | None]] = Field(description="per cell, the summed histogram over bin_edges")
    bin_edges: list[float] = Field(
        description="bins: [exactly 0], (0, E0], (E0, E1], …, (E_last, +inf): len(bin_edges) + 2 counts"
    )


class SparsityCurve(BaseModel):
    analysis: str
    mode: Mode
    tau: list[float] = Field(description="every histogram edge")
    sparsity: list[float] = Field(description="model sparsity at each τ")
    zero_share: float | None = Field(description="share of weights whose stored value did not change")


class Spectrum(BaseModel):
    idx: list[int] = Field(description="0-based positions kept (downsampled when long)")
    sigma: list[float]


class UpdateMap(BaseModel):
    tau: float
    grid_rows: int
    grid_cols: int
    cells: list[float] = Field(description="fraction changed, row-major grid_rows × grid_cols")
    row_frac: list[float]
    col_frac: list[float]
    head_frac: list[float] | None = Field(description="per attention head, when heads are known")


class ModeCount(BaseModel):
    mode: Mode
    tau: float
    count: int


class EnrichmentCount(BaseModel):
    percent: int = Field(description="the selection: top `percent` % of the entries")
    selected: int = Field(
        description="|P| = ⌈N·percent/100⌉ (ties at the threshold: lowest row-major index first)"
    )
    observed: int = Field(description="|M ∧ P|: changed weights inside the selection")
    expected: float = Field(description="|M|·|P|/N: a random mask of the same size")
    ratio: float | None = Field(description="observed / expected; null when nothing changed")


class Enrichment(BaseModel):
    tau: float = Field(description="the mask's τ: the analysis's first")
    mode: str = Field(description="absolute (|Δ| > τ) or relative (|Δ| > τ·|b|)")
    numel: int
    changed: int = Field(description="|M|")
    magnitude: list[EnrichmentCount] = Field(description="selections of the largest |W₀|")
    principal_k: int = Field(description="rank of W₀'s reconstruction U_k Σ_k V_kᵀ")
    principal: list[EnrichmentCount] = Field(description="selections of the largest |U_k Σ_k V_kᵀ|")


class PrincipalAngles(BaseModel):
    left_max_deg: list[float] = Field(
        description="per k: largest angle between W₀'s and W₁'s top-k left subspaces"
    )
    left_mean_cos2: list[float] = Field(description="per k: mean cos² of those angles (1 = same subspace)")
    right_max_deg: list[float]
    right_mean_cos2: list[float]


class Intruders(BaseModel):
    count: list[int] = Field(
        description="per k: W₁'s top-k left singular vectors matching none of W₀'s top 2k"
    )
    indices: list[list[int]] = Field(description="per k: their 0-based positions in W₁'s spectrum")
    threshold: float = Field(description="|cosine| a match must exceed")


class TensorGeometry(BaseModel):
    """ΔW = W₁ − W₀ against W₀'s singular subspaces, and where the update mask falls (2-D matrices)."""

    skipped: str | None = Field(None, description="why no figures (too large); the rest is then absent")
    k: list[int] | None = Field(None, description="1, 8, 32 capped at min(m, n); every list follows it")
    method: Literal["exact", "randomized"] | None = None
    energy_in_topk: list[float] | None = Field(None, description="‖U_kᵀ ΔW V_k‖²/‖ΔW‖²; null when ΔW = 0")
    left_in_topk: list[float] | None = Field(None, description="‖U_kᵀ ΔW‖²/‖ΔW‖²")
    right_in_topk: list[float] | None = Field(None, description="‖ΔW V_k‖²/‖ΔW‖²")
    angles: PrincipalAngles | None = None
    drift: list[float | None] | None = Field(None, description="σᵢ(W₁)/σᵢ(W₀), i < max k")
    rank1_dominance: float | None = Field(None, description="σ₁(ΔW)²/‖ΔW‖²")
    intruders: Intruders | None = None
    enrichment: Enrichment | None = None


class EnrichmentGrid(BaseModel):
    selector: Literal["magnitude", "principal"]
    percent: int
    ratio: list[list[float | None]] = Field(description="Σ observed / Σ expected per cell")


class PooledEnrichment(BaseModel):
    percent: int
    ratio: float | None


class PooledGeometry(BaseModel):
    matrices: int
    energy_in_top8: float | None = Field(description="‖ΔW‖²-weighted mean share in W₀'s top-8 subspaces")
    rank1_dominance: float | None = Field(description="‖ΔW‖²-weighted mean of σ₁(ΔW)²/‖ΔW‖²")
    enrichment: dict[str, list[PooledEnrichment]] = Field(description="per selector: Σ observed / Σ expected")


class GeometryView(BaseModel):
    """A pair's principal geometry per layer × matrix type (each cell pools its matrices)."""

    analysis: str
    tau: float | None = Field(description="the update mask's τ (the analysis's first)")
    mode: str | None
    layers: list[Layer]
    matrices: list[str]
    count: list[list[int | None]] = Field(description="matrices with geometry per cell")
    energy_in_top8: list[list[float | None]]
    rank1_dominance: list[list[float | None]]
    enrichment: list[EnrichmentGrid]
    model: PooledGeometry | None = Field(description="the whole model pooled")


class UlpHistogram(BaseModel):
    """|Δ| in ULPs of the base's stored dtype at the base value (u = |t − b| / ulp(b))."""

    dtype: str = Field(description="the base's stored dtype the ULP is of")
    counts: list[int] = Field(description="[u = 0], (0, E0], (E0, E1], …, (E_last, +inf): len(edges) + 2")
    one_ulp: int = Field(description="counts[1]: weights moved by more than 0 and at most 1 ULP")
    edges: list[float] = Field(description="1, 2, …, 16, then octaves 32 … 2^64")
    visibility_floor: float = Field(description="no stored change is below this · |b| (2^-(p+1))")


class TensorDetail(RankFigures):
    """One matrix in detail: its row of the results, histograms, spectrum and update map."""

    run: int = Field(description="target index: 0 for a pair")
    name: str
    source: str
    layer: Layer
    block: str
    matrix: str
    expert: int | None
    shape: list[int]
    numel: int
    dtype: str
    norm_delta: float | None
    norm_base: float | None
    max_abs_delta: float | None
    sum_abs_delta: float | None
    histograms: dict[str, list[int]] = Field(description="per mode (abs, rel), counts over bin_edges")
    bin_edges: list[float]
    spectrum: Spectrum | None
    update_map: UpdateMap | None
    changed: list[ModeCount]
    ulp_histogram: UlpHistogram | None = Field(
        None, description="pair: the ULP histogram (null for dtypes without one: integers, fp8 dequantized)"
    )
    geometry: TensorGeometry | None = Field(
        None, description="null for vectors, --no-geometry, older results"
    )


class SeriesView(BaseModel):
    base: str
    checkpoints: list[str]
    tau: float
    numel: int
    steps: list[SeriesStep]
    categories: SeriesCategories
    transient_heatmap: TransientHeatmap


class OverlapLayer(BaseModel):
    layer: Layer
    numel: int
    changed: list[int] = Field(description="per run")
    both: list[int] = Field(description="per pair, in the order of summary.pairs")


class OverlapView(BaseModel):
    runs: list[str]
    tau: float
    summary: OverlapFigures
    layers: list[OverlapLayer]


CompareMetric = Literal["sparsity", "rank_pct", "relative_change"]


class ComparedLayer(BaseModel):
    layer: Layer
    sparsity: float
    value: float | None = Field(description="the comparison's metric (null: not computed, e.g. no rank)")
    changed: int
    numel: int


class ComparedAnalysis(BaseModel):
    analysis: str
    base: str
    target: str
    sparsity: float
    value: float | None = Field(description="the comparison's metric over the whole model")
    layers: list[ComparedLayer]


class Comparison(BaseModel):
    tau: float = Field(description="the histogram edge τ snapped to")
    mode: Mode
    metric: CompareMetric
    analyses: list[ComparedAnalysis]


# --- update-mask export jobs ---------------------------------------------------------------------
class MaskIn(BaseModel):
    tau: Tau | None = Field(None, description="τ of the mask (default: the analysis' first τ)")
    relative: bool | None = Field(None, description="|Δ| > τ·|base| (default: the analysis' mode)")
    format: Literal["bool", "packed"] = Field(
        "bool", description="bool: one byte per weight, shape kept; packed: packbits, little bit order"
    )
    run: int = Field(-1, description="which checkpoint after the base (1 …; negative counts from the last)")


class MaskOut(BaseModel):
    id: str = Field(description="the mask's id: the same (analysis, run, τ, mode, format) gives the same id")
    analysis: str
    status: Literal["queued", "running", "done", "failed"]
    progress: float = Field(description="0 … 1")
    error: ErrorOut | None = Field(description="why it failed, when it did")
    run: int = Field(description="index of the target checkpoint in the analysis' checkpoints (base = 0)")
    checkpoint: str = Field(description="id of the target checkpoint")
    tau: float
    relative: bool
    format: Literal["bool", "packed"]
    size: int | None = Field(description="bytes of the file, once done")
    file: str | None = Field(description="where to download the safetensors file, once done")
