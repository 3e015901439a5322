"""Analyses: create, follow, cancel, delete — and read their results."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from deltalens.backend import masks, results
from deltalens.backend.deps import CatalogDep, JobsDep, WriteAccess
from deltalens.backend.errors import WRITE, ApiError, ErrorOut, errors, found, link
from deltalens.backend.routes.checkpoints import Created

router = APIRouter(prefix="/api", tags=["analyses"])
Mode = Literal["abs", "rel"]


class AnalysisIn(BaseModel):
    kind: Literal["pair", "series", "overlap"]
    checkpoints: list[str] = Field(description="checkpoint ids in the CLI's order: base first")
    taus: list[float] = Field([1e-5], max_length=16)
    relative: bool = False
    rank: bool = True


class AnalysisOut(BaseModel):
    id: str
    kind: Literal["pair", "series", "overlap"]
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float
    error: ErrorOut | None
    checkpoints: list[str]
    taus: list[float]
    relative: bool
    created_at: str
    updated_at: str
    detail: dict[str, Any] | None = Field(description="the worker's latest progress report")


NOT_READY = errors(404, 409)  # no such analysis; not done yet, or the wrong kind for this view
AID = "$response.body#/id"
TO_ANALYSIS = {
    "GetAnalysis": link("/api/analyses/{aid}", "get", "follow the analysis", aid=AID),
    "GetResult": link("/api/analyses/{aid}/result", "get", "the result document, once done", aid=AID),
    "GetHeatmap": link("/api/analyses/{aid}/heatmap", "get", "the layer × matrix heatmap of a pair", aid=AID),
    "CancelAnalysis": link("/api/analyses/{aid}/cancel", "post", "stop it", aid=AID),
    "DeleteAnalysis": link("/api/analyses/{aid}", "delete", "forget it", aid=AID),
}


def status_of(job: dict) -> dict:
    error = {"code": job["error_code"], "message": job["error_message"]} if job["error_code"] else None
    return {
        "id": job["id"],
        "kind": job["kind"],
        "status": job["status"],
        "progress": job["progress"],
        "error": error,
        "checkpoints": job["checkpoints"],
        "taus": job["taus"],
        "relative": job["relative"],
        "created_at": job["created_at"].isoformat() + "Z",
        "updated_at": job["updated_at"].isoformat() + "Z",
        "detail": json.loads(job["detail"]) if job["detail"] else None,
    }


def _job(catalog, aid: str) -> dict:
    return found(catalog.job(aid), "analysis", aid)


@router.post(
    "/analyses",
    status_code=202,
    dependencies=WriteAccess,
    response_model=Created,
    responses={**WRITE, **errors(404), 202: {"links": TO_ANALYSIS}},
)
def create(body: AnalysisIn, jobs: JobsDep) -> dict:
    return {"id": jobs.submit(body.kind, body.checkpoints, body.taus, body.relative, body.rank)}


@router.get("/analyses", response_model=list[AnalysisOut])
def list_analyses(catalog: CatalogDep) -> list[dict]:
    return [status_of(j) for j in catalog.jobs()]


@router.get("/analyses/{aid}", response_model=AnalysisOut, responses=errors(404))
def get_analysis(aid: str, catalog: CatalogDep) -> dict:
    return status_of(_job(catalog, aid))


@router.post(
    "/analyses/{aid}/cancel",
    dependencies=WriteAccess,
    response_model=AnalysisOut,
    responses={**WRITE, **errors(404, 409)},
)
def cancel(aid: str, jobs: JobsDep, catalog: CatalogDep) -> dict:
    jobs.cancel(aid)
    return status_of(_job(catalog, aid))


@router.delete(
    "/analyses/{aid}", status_code=204, dependencies=WriteAccess, responses={**WRITE, **errors(404)}
)
def delete(aid: str, jobs: JobsDep) -> Response:
    jobs.delete(aid)
    return Response(status_code=204)


@router.get("/analyses/{aid}/result", responses=NOT_READY)
def result(aid: str, catalog: CatalogDep) -> dict:
    """The same object `deltalens ... --json` writes."""
    return results.document(catalog, aid)


@router.get("/analyses/{aid}/summary", responses=NOT_READY)
def summary(aid: str, catalog: CatalogDep) -> dict:
    doc = results.document(catalog, aid)
    keep = {k: v for k, v in doc.items() if k not in ("tensors",)}
    return {**keep, "tensor_count": len(doc.get("tensors", []))}


@router.get("/analyses/{aid}/heatmap", responses=NOT_READY)
def heatmap(
    aid: str, catalog: CatalogDep, metric: str = "sparsity", tau: float = 1e-5, mode: Mode = "abs"
) -> dict:
    """Layer × matrix type grid of a metric; τ snaps to the nearest histogram edge."""
    return results.heatmap(catalog, aid, metric, tau, mode)


@router.get("/analyses/{aid}/heatmap-cube", responses=NOT_READY)
def heatmap_cube(aid: str, catalog: CatalogDep, mode: Mode = "abs") -> dict:
    """Summed |Δ| histograms per layer × matrix cell: sparsity at every τ without another request."""
    return results.heatmap_cube(catalog, aid, mode)


@router.get("/analyses/{aid}/sparsity-curve", responses=NOT_READY)
def sparsity_curve(aid: str, catalog: CatalogDep, mode: Mode = "abs") -> dict:
    kind = _job(catalog, aid)["kind"]
    if kind != "pair":  # a series/overlap stores no |Δ| histograms to read a curve from
        raise ApiError(409, "wrong_kind", f"sparsity curves are drawn for pair analyses; {aid} is a {kind}")
    return results.sparsity_curve(catalog, aid, mode)


@router.get("/analyses/{aid}/tensors", responses=NOT_READY)
def tensors(aid: str, catalog: CatalogDep) -> list[dict]:
    return results.document(catalog, aid)["tensors"]


@router.get("/analyses/{aid}/tensors/{name:path}", responses=NOT_READY, response_model=dict)
def tensor(aid: str, name: str, catalog: CatalogDep) -> Response:
    """Histograms, singular spectrum, update map and counts of one matrix."""
    return Response(results.tensor_detail(catalog, aid, name), media_type="application/json")


@router.get("/analyses/{aid}/series", responses=NOT_READY)
def series(aid: str, catalog: CatalogDep) -> dict:
    doc = results.document(catalog, aid)
    if doc["kind"] != "series":
        raise ApiError(409, "wrong_kind", f"analysis {aid} is a {doc['kind']}, not a series")
    return {k: doc[k] for k in ("checkpoints", "tau", "numel", "steps", "categories")}


@router.get("/analyses/{aid}/overlap", responses=NOT_READY)
def overlap(aid: str, catalog: CatalogDep) -> dict:
    doc = results.document(catalog, aid)
    if doc["kind"] != "overlap":
        raise ApiError(409, "wrong_kind", f"analysis {aid} is a {doc['kind']}, not an overlap")
    per_layer = {}
    for t in doc["tensors"]:
        layer = per_layer.setdefault(
            t["layer"],
            {
                "layer": t["layer"],
                "numel": 0,
                "changed": [0] * len(doc["runs"]),
                "both": [0] * len(t["pairs"]),
            },
        )
        layer["numel"] += t["numel"]
        layer["changed"] = [a + b for a, b in zip(layer["changed"], t["changed"])]
        layer["both"] = [a + p["both"] for a, p in zip(layer["both"], t["pairs"])]
    return {
        "runs": doc["runs"],
        "tau": doc["tau"],
        "summary": doc["summary"],
        "layers": sorted(per_layer.values(), key=lambda r: (r["layer"] is None, r["layer"] or 0)),
    }


@router.get("/compare", responses=NOT_READY)
def compare(
    catalog: CatalogDep,
    ids: str = Query(description="comma-separated pair analysis ids"),
    tau: float = 1e-5,
    mode: Mode = "abs",
) -> dict:
    return results.compare(catalog, [i for i in ids.split(",") if i], tau, mode)


@router.get(
    "/analyses/{aid}/mask",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        **errors(404, 409),
    },
)
def mask(
    aid: str,
    catalog: CatalogDep,
    tau: float | None = None,
    relative: bool | None = None,
    format: Literal["bool", "packed"] = "bool",
    run: int = Query(-1, description="which target/run/checkpoint (default: the last one)"),
) -> StreamingResponse:
    """The update mask (|Δ| > τ per weight) as safetensors, for sparse fine-tuning of the subnetwork."""
    job = _job(catalog, aid)
    ids = job["checkpoints"]
    if not -len(ids) < run < len(ids) or run % len(ids) == 0:
        raise ApiError(
            422, "invalid_request", f"run must pick one of the {len(ids) - 1} checkpoints after the base"
        )
    base, target = catalog.checkpoint(ids[0]), catalog.checkpoint(ids[run])
    if base is None or target is None:
        raise ApiError(409, "checkpoint_gone", "a checkpoint of this analysis is no longer registered")
    tau = job["taus"][0] if tau is None else tau
    if not (math.isfinite(tau) and tau >= 0):
        raise ApiError(422, "invalid_request", "tau must be a finite number >= 0")
    relative = job["relative"] if relative is None else relative
    size, body = masks.mask_file(base["path"], target["path"], tau, relative, format == "packed")
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="mask-{aid}-{format}.safetensors"',
    }
    return StreamingResponse(body, media_type="application/octet-stream", headers=headers)
