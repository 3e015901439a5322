"""Analyses: create, follow, cancel, delete — and read their results."""

from __future__ import annotations

import json
import threading

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from deltalens.backend import masks, results
from deltalens.backend.catalog import Catalog
from deltalens.backend.deps import CatalogDep, JobsDep, SettingsDep, WriteAccess
from deltalens.backend.errors import WRITE, errors, found, link, not_found
from deltalens.backend.jobs import Jobs
from deltalens.backend.models import (
    MAX_TITLE,
    AnalysisIn,
    AnalysisOut,
    AnalysisRename,
    CompareMetric,
    Comparison,
    Created,
    ErrorOut,
    GeometryView,
    Heatmap,
    HeatmapCube,
    MaskIn,
    MaskOut,
    OverlapView,
    Redelivered,
    ResultDocument,
    ResultSummary,
    SeriesView,
    ServerConfig,
    SparsityCurve,
    TensorChanged,
    TensorDetail,
    TensorRow,
)
from deltalens.worker.contract import DEFAULT_TAU, Mode

router = APIRouter(prefix="/api", tags=["analyses"])
JSON = "application/json"

NOT_READY = errors(404, 409)  # no such analysis; not done yet, or the wrong kind for this view
AID = "$response.body#/id"
TO_ANALYSIS = {
    "GetAnalysis": link("/api/analyses/{aid}", "get", "follow the analysis", aid=AID),
    "GetResult": link("/api/analyses/{aid}/result", "get", "the result document, once done", aid=AID),
    "GetHeatmap": link("/api/analyses/{aid}/heatmap", "get", "the layer × matrix heatmap of a pair", aid=AID),
    "CancelAnalysis": link("/api/analyses/{aid}/cancel", "post", "stop it", aid=AID),
    "RenameAnalysis": link("/api/analyses/{aid}", "patch", "give it another title", aid=AID),
    "DeleteAnalysis": link("/api/analyses/{aid}", "delete", "forget it", aid=AID),
}


def status_of(job: dict, catalog: Catalog) -> AnalysisOut:
    error = ErrorOut(code=job["error_code"], message=job["error_message"]) if job["error_code"] else None
    return AnalysisOut(
        id=job["id"],
        kind=job["kind"],
        title=job["title"],
        headline=catalog.headline(job),
        status=job["status"],
        progress=job["progress"],
        error=error,
        checkpoints=job["checkpoints"],
        taus=job["taus"],
        relative=job["relative"],
        created_at=job["created_at"].isoformat() + "Z",
        updated_at=job["updated_at"].isoformat() + "Z",
        detail=json.loads(job["detail"]) if job["detail"] else None,
    )


def _job(catalog, aid: str) -> dict:
    return found(catalog.job(aid), "analysis", aid)


@router.post(
    "/analyses",
    status_code=202,
    dependencies=WriteAccess,
    response_model=Created,
    responses={**WRITE, **errors(404), 202: {"links": TO_ANALYSIS}},
)
def create(body: AnalysisIn, jobs: JobsDep) -> Created:
    return Created(
        id=jobs.submit(
            body.kind, body.checkpoints, body.taus, body.relative, body.rank, body.geometry, body.title
        )
    )


@router.post("/analyses/redeliver", dependencies=WriteAccess, responses=WRITE)
def redeliver(jobs: JobsDep, request: Request) -> Redelivered:
    """Send every unfinished analysis and mask export to the workers again — after a worker was lost
    with a broker that forgets taken messages (`deltalens up` calls this when it restarts its worker)."""
    return Redelivered(ids=jobs.redeliver(), masks=_masks(request, jobs).redeliver())


@router.get("/analyses")
def list_analyses(catalog: CatalogDep) -> list[AnalysisOut]:
    """Every analysis, oldest first, with its title and (once done) its headline figure."""
    return [status_of(j, catalog) for j in catalog.jobs()]


@router.get("/analyses/{aid}", responses=errors(404))
def get_analysis(aid: str, catalog: CatalogDep) -> AnalysisOut:
    return status_of(_job(catalog, aid), catalog)


@router.patch("/analyses/{aid}", dependencies=WriteAccess, responses={**WRITE, **errors(404)})
def rename(aid: str, body: AnalysisRename, catalog: CatalogDep) -> AnalysisOut:
    """Give the analysis another title (its results are untouched)."""
    if not catalog.rename_job(aid, body.title):
        raise not_found("analysis", aid)
    return status_of(_job(catalog, aid), catalog)


@router.get("/config", tags=["meta"])
def config(settings: SettingsDep) -> ServerConfig:
    """What the New page checks before an upload: whether pickled weights are accepted, size limits."""
    return ServerConfig(
        allow_pickle=settings.allow_pickle, max_upload_bytes=settings.max_upload_bytes, max_title=MAX_TITLE
    )


@router.post(
    "/analyses/{aid}/cancel",
    dependencies=WriteAccess,
    response_model=AnalysisOut,
    responses={**WRITE, **errors(404, 409)},
)
def cancel(aid: str, jobs: JobsDep, catalog: CatalogDep) -> AnalysisOut:
    jobs.cancel(aid)
    return status_of(_job(catalog, aid), catalog)


@router.delete(
    "/analyses/{aid}", status_code=204, dependencies=WriteAccess, responses={**WRITE, **errors(404)}
)
def delete(aid: str, jobs: JobsDep) -> Response:
    jobs.delete(aid)
    return Response(status_code=204)


@router.get("/analyses/{aid}/result", response_model=ResultDocument, responses=NOT_READY)
def result(aid: str, catalog: CatalogDep) -> Response:
    """The same object `deltalens ... --json` writes (its stored text, served as is)."""
    return Response(results.document_text(catalog, aid), media_type=JSON)


@router.get("/analyses/{aid}/summary", response_model_exclude_unset=True, responses=NOT_READY)
def summary(aid: str, catalog: CatalogDep) -> ResultSummary:
    """The result document without its per-tensor rows, and how many rows there are."""
    doc = results.document(catalog, aid)
    tensors = doc.pop("tensors", [])
    return ResultSummary.model_validate({**doc, "tensor_count": len(tensors)})


@router.get("/analyses/{aid}/heatmap", responses=NOT_READY)
def heatmap(
    aid: str,
    catalog: CatalogDep,
    metric: str = Query("sparsity", description=f"one of {', '.join(results.HEATMAP_METRICS)}"),
    tau: float = DEFAULT_TAU,
    mode: Mode = "abs",
) -> Heatmap:
    """Layer × matrix type grid of a metric; τ snaps to the nearest histogram edge."""
    return Heatmap(**results.heatmap(catalog, aid, metric, tau, mode))


@router.get("/analyses/{aid}/heatmap-cube", responses=NOT_READY)
def heatmap_cube(aid: str, catalog: CatalogDep, mode: Mode = "abs") -> HeatmapCube:
    """Summed |Δ| histograms per layer × matrix cell: sparsity at every τ without another request."""
    return HeatmapCube(**results.heatmap_cube(catalog, aid, mode))


@router.get("/analyses/{aid}/tensor-changed", responses=NOT_READY)
def tensor_changed(
    aid: str, catalog: CatalogDep, tau: float = DEFAULT_TAU, mode: Mode = "abs"
) -> TensorChanged:
    """Per matrix, weights changed at τ (snapped to the nearest histogram edge) of a pair analysis."""
    return TensorChanged(**results.tensor_changed(catalog, aid, tau, mode))


@router.get("/analyses/{aid}/sparsity-curve", responses=NOT_READY)
def sparsity_curve(aid: str, catalog: CatalogDep, mode: Mode = "abs") -> SparsityCurve:
    """Model sparsity at every histogram edge τ (pair analyses)."""
    return SparsityCurve(**results.sparsity_curve(catalog, aid, mode))


@router.get("/analyses/{aid}/tensors", response_model_exclude_unset=True, responses=NOT_READY)
def tensors(aid: str, catalog: CatalogDep) -> list[TensorRow]:
    """The result document's per-tensor rows (beyond the fields named here, they depend on the kind:
    see PairTensor, SeriesTensor, OverlapTensor)."""
    return [TensorRow.model_validate(row) for row in results.document(catalog, aid)["tensors"]]


@router.get("/analyses/{aid}/tensors/{name:path}", response_model=TensorDetail, responses=NOT_READY)
def tensor(aid: str, name: str, catalog: CatalogDep) -> Response:
    """Histograms, singular spectrum, update map and counts of one matrix (cached JSON, served as is)."""
    return Response(results.tensor_detail(catalog, aid, name), media_type=JSON)


@router.get("/analyses/{aid}/geometry", responses=NOT_READY)
def geometry(aid: str, catalog: CatalogDep) -> GeometryView:
    """Layer × matrix-type grids of a pair's principal geometry: energy of ΔW in the base's top-8
    singular subspaces, rank-1 dominance, and enrichment of the update mask in the largest weights."""
    return GeometryView(**results.geometry(catalog, aid))


@router.get("/analyses/{aid}/series", responses=NOT_READY)
def series(aid: str, catalog: CatalogDep) -> SeriesView:
    """Whole-model steps and categories of a series analysis."""
    return SeriesView(**results.series(catalog, aid))


# exclude_unset: `venn` only for 2–3 runs, as in the result document
@router.get("/analyses/{aid}/overlap", response_model_exclude_unset=True, responses=NOT_READY)
def overlap(aid: str, catalog: CatalogDep) -> OverlapView:
    """Whole-model overlap figures of the runs, and per-layer sums."""
    return OverlapView(**results.overlap(catalog, aid))


@router.get("/compare", responses=NOT_READY)
def compare(
    catalog: CatalogDep,
    ids: str = Query(description="comma-separated pair analysis ids"),
    tau: float = DEFAULT_TAU,
    mode: Mode = "abs",
    metric: CompareMetric = "sparsity",
) -> Comparison:
    """Per-layer and model sparsity and `metric` of several pair analyses side by side (e.g. SFT vs RL
    stage); rank_pct is the mean over ranked matrices, relative_change ‖Δ‖/‖W‖ of the summed squares."""
    return Comparison(**results.compare(catalog, [i for i in ids.split(",") if i], tau, mode, metric))


def _masks(request: Request, jobs: Jobs) -> masks.Masks:
    state = request.app.state
    with _limit_lock:
        if getattr(state, "mask_rate_limit", None) is None:
            state.mask_rate_limit = masks.RateLimit(jobs.settings.mask_jobs_per_minute)
    return masks.Masks(jobs.settings, jobs.catalog, jobs.celery, state.mask_rate_limit)


_limit_lock = threading.Lock()
MID = "$response.body#/id"
AID_IN = "$request.path.aid"
TO_MASK = {
    "GetMask": link("/api/analyses/{aid}/masks/{mid}", "get", "poll the mask job", aid=AID_IN, mid=MID),
    "GetMaskFile": link(
        "/api/analyses/{aid}/masks/{mid}/file", "get", "the file, once done", aid=AID_IN, mid=MID
    ),
}


@router.post(
    "/analyses/{aid}/masks",
    status_code=202,
    dependencies=WriteAccess,
    response_model=MaskOut,
    responses={**WRITE, **errors(404, 409, 429), 202: {"links": TO_MASK}},
)
def create_mask(aid: str, body: MaskIn, request: Request, jobs: JobsDep) -> MaskOut:
    """Export the update mask (|Δ| > τ per weight) of a done analysis as safetensors, for sparse fine-tuning
    of the subnetwork. A worker computes it; poll `GET .../masks/{mid}` until `done`, then download
    `file`. The same (run, τ, mode, format) gives the same mask id and is computed once; a failed mask is
    tried again. Rate-limited per client (429)."""
    client = request.client.host if request.client else "unknown"
    return _masks(request, jobs).create(aid, body, client)


@router.get("/analyses/{aid}/masks/{mid}", responses=errors(404))
def get_mask(aid: str, mid: str, request: Request, jobs: JobsDep) -> MaskOut:
    """A mask job: queued, running, done (with `file` and `size`) or failed (with a reason)."""
    return _masks(request, jobs).status(aid, mid)


@router.get(
    "/analyses/{aid}/masks/{mid}/file",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        **errors(404, 409),
    },
)
def mask_file(aid: str, mid: str, request: Request, jobs: JobsDep) -> FileResponse:
    """The mask as a safetensors file (`bool`: BOOL tensors of the weights' shapes; `packed`: U8 packbits,
    little bit order, true shapes in the header metadata). 409 until the job is done."""
    path, status = _masks(request, jobs).file(aid, mid)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"mask-{aid}-run{status.run}-{status.format}.safetensors",
    )
