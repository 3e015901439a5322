"""Checkpoints: register a server path, or upload files in resumable chunks."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from deltalens.backend.deps import CatalogDep, SettingsDep, UploadsDep, WriteAccess
from deltalens.backend.errors import WRITE, ApiError, errors, found, link
from deltalens.backend.uploads import NAME, register_path

router = APIRouter(prefix="/api", tags=["checkpoints"])


class PathIn(BaseModel):
    path: str = Field(
        description="a checkpoint folder or .safetensors file under DELTALENS_ALLOWED_ROOTS",
        max_length=4096,
        pattern=r"^[^\x00]*$",
    )


class FileIn(BaseModel):
    name: str = Field(
        json_schema_extra={"pattern": NAME.pattern},  # checked by Uploads (422 invalid_name)
        description=".safetensors weights or .json metadata",
    )
    size: int = Field(ge=0)


class UploadIn(BaseModel):
    name: str = Field("checkpoint", max_length=200)
    files: list[FileIn] = Field(max_length=10_000)


class Created(BaseModel):
    id: str


class UploadFileOut(FileIn):
    received: int = Field(description="bytes of the file's contiguous prefix the server holds")


class UploadOut(BaseModel):
    id: str
    name: str
    files: list[UploadFileOut]
    complete: bool


class ChunkOut(BaseModel):
    name: str
    received: int
    size: int


TO_CHECKPOINT = {
    "GetCheckpoint": link(
        "/api/checkpoints/{cid}", "get", "the registered checkpoint", cid="$response.body#/id"
    )
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
    responses={**WRITE, **errors(403, 404), 201: {"links": TO_CHECKPOINT}},
)
def register(body: PathIn, settings: SettingsDep, catalog: CatalogDep) -> dict:
    try:
        return {"id": register_path(body.path, settings, catalog)}
    except OSError as e:  # a name too long for the file system, a folder it may not read, ...
        raise ApiError(422, "invalid_path", f"{body.path[:200]}: {e.strerror or e}") from None


@router.get("/checkpoints")
def list_checkpoints(catalog: CatalogDep) -> list[dict]:
    return catalog.checkpoints()


@router.get("/checkpoints/{cid}", responses=errors(404))
def get_checkpoint(cid: str, catalog: CatalogDep) -> dict:
    return found(catalog.checkpoint(cid), "checkpoint", cid)


@router.post(
    "/uploads",
    status_code=201,
    dependencies=WriteAccess,
    response_model=UploadOut,
    responses={**WRITE, **errors(413, 415, 507), 201: {"links": TO_UPLOAD}},
)
def create_upload(body: UploadIn, uploads: UploadsDep) -> dict:
    return uploads.create(body.name, [f.model_dump() for f in body.files])


@router.get("/uploads/{sid}", response_model=UploadOut, responses=errors(404))
def upload_status(sid: str, uploads: UploadsDep) -> dict:
    return uploads.status(sid)


@router.put(
    "/uploads/{sid}/files/{name}",
    dependencies=WriteAccess,
    response_model=ChunkOut,
    responses={**WRITE, **errors(404, 409, 413, 507)},
    openapi_extra=RAW_BODY,
)
async def upload_chunk(
    sid: str,
    name: str,
    request: Request,
    uploads: UploadsDep,
    offset: int = Query(0, ge=0, description="byte offset of this chunk in the file"),
) -> dict:
    """Send bytes [offset, offset+len) of one file. Resend freely: bytes already received are skipped."""
    return await uploads.write(sid, name, offset, request.stream())


@router.post(
    "/uploads/{sid}/complete",
    status_code=201,
    dependencies=WriteAccess,
    response_model=Created,
    responses={**WRITE, **errors(404, 409, 507), 201: {"links": TO_CHECKPOINT}},
)
def complete_upload(sid: str, uploads: UploadsDep) -> dict:
    """Validate every file, store it by sha256 and register the checkpoint."""
    return {"id": uploads.complete(sid)}
