"""Checkpoints: register a server path, or upload files in resumable chunks."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from deltalens.backend.deps import CatalogDep, DownloadsDep, SettingsDep, UploadsDep, WriteAccess
from deltalens.backend.errors import WRITE, ApiError, errors, found, link
from deltalens.backend.models import (
    CheckpointOut,
    ChunkOut,
    Created,
    DownloadOut,
    PathIn,
    UploadIn,
    UploadOut,
)
from deltalens.backend.uploads import register_path

router = APIRouter(prefix="/api", tags=["checkpoints"])


TO_CHECKPOINT = {
    "GetCheckpoint": link(
        "/api/checkpoints/{cid}", "get", "the registered checkpoint", cid="$response.body#/id"
    )
}
TO_DOWNLOAD = {
    "GetDownload": link("/api/downloads/{did}", "get", "the download's progress", did="$response.body#/id")
}
TO_UPLOAD = {
    "GetUpload": link("/api/uploads/{sid}", "get", "the session's progress", sid="$response.body#/id"),
    "SendChunk": link(
        "/api/uploads/{sid}/files/{name}",
        "put",
        "send bytes of the first file",
        sid="$response.body#/id",
        name="$response.body#/files/0/name",
    ),
    "CompleteUpload": link(
        "/api/uploads/{sid}/complete", "post", "finish the upload", sid="$response.body#/id"
    ),
}
# PUT .../files/{name} streams the raw request body; declared here since the route reads it itself
RAW_BODY = {
    "requestBody": {
        "required": False,
        "description": "bytes [offset, offset + length) of the file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/checkpoints",
    status_code=201,
    dependencies=WriteAccess,
    response_model=Created,
    responses={
        **WRITE,
        **errors(403, 404, 415, 429),
        201: {"links": TO_CHECKPOINT},
        202: {"model": DownloadOut, "description": "a hub download, queued", "links": TO_DOWNLOAD},
    },
)
def register(
    body: PathIn, settings: SettingsDep, catalog: CatalogDep, downloads: DownloadsDep
) -> Created | JSONResponse:
    """`{"path"}`: register a checkpoint on a server volume (201). `{"hub"}`: download a model from the
    Hugging Face hub in the background (202); follow it with GET /api/downloads/{id}."""
    if body.hub is not None:
        record = DownloadOut(**downloads.start(body.hub))
        return JSONResponse(record.model_dump(mode="json"), status_code=202)
    try:
        return Created(id=register_path(body.path, settings, catalog))
    except OSError as e:  # a name too long for the file system, a folder it may not read, ...
        raise ApiError(422, "invalid_path", f"{body.path[:200]}: {e.strerror or e}") from None


@router.get("/downloads/{did}", responses=errors(404))
def get_download(did: str, downloads: DownloadsDep) -> DownloadOut:
    """A hub download's state and progress; `checkpoint` once done, `error` once failed."""
    return DownloadOut(**downloads.get(did))


# exclude_unset: a file's sha256 is there for uploads only
@router.get("/checkpoints", response_model_exclude_unset=True)
def list_checkpoints(catalog: CatalogDep) -> list[CheckpointOut]:
    return [CheckpointOut(**c) for c in catalog.checkpoints()]


@router.get("/checkpoints/{cid}", response_model_exclude_unset=True, responses=errors(404))
def get_checkpoint(cid: str, catalog: CatalogDep) -> CheckpointOut:
    return CheckpointOut(**found(catalog.checkpoint(cid), "checkpoint", cid))


@router.post(
    "/uploads",
    status_code=201,
    dependencies=WriteAccess,
    response_model=UploadOut,
    responses={**WRITE, **errors(413, 415, 429, 507), 201: {"links": TO_UPLOAD}},
)
def create_upload(body: UploadIn, request: Request, uploads: UploadsDep) -> UploadOut:
    """Open an upload session (at most DELTALENS_MAX_UPLOAD_SESSIONS unfinished ones per client; one that
    receives nothing for DELTALENS_UPLOAD_SESSION_TTL seconds is removed)."""
    client = request.client.host if request.client else "unknown"
    return UploadOut(**uploads.create(body.name, [f.model_dump() for f in body.files], client))


@router.get("/uploads/{sid}", responses=errors(404, 409))
def upload_status(sid: str, uploads: UploadsDep) -> UploadOut:
    return UploadOut(**uploads.status(sid))


@router.put(
    "/uploads/{sid}/files/{name}",
    dependencies=WriteAccess,
    response_model=ChunkOut,
    responses={**WRITE, **errors(404, 408, 409, 413, 507)},
    openapi_extra=RAW_BODY,
)
async def upload_chunk(
    sid: str,
    name: str,
    request: Request,
    uploads: UploadsDep,
    offset: int = Query(0, ge=0, description="byte offset of this chunk in the file"),
) -> ChunkOut:
    """Send bytes [offset, offset+len) of one file. Resend freely: bytes already received are skipped.
    One request at a time per file: a second one meanwhile gets 409 upload_busy."""
    return ChunkOut(**await uploads.write(sid, name, offset, request.stream()))


@router.post(
    "/uploads/{sid}/complete",
    status_code=201,
    dependencies=WriteAccess,
    response_model=Created,
    responses={**WRITE, **errors(404, 409, 507), 201: {"links": TO_CHECKPOINT}},
)
def complete_upload(sid: str, uploads: UploadsDep) -> Created:
    """Validate every file, store it by sha256 and register the checkpoint."""
    return Created(id=uploads.complete(sid))
