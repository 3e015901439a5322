"""Checkpoints: register a server path, or upload files in resumable chunks."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from backend.deps import CatalogDep, SettingsDep, UploadsDep, WriteAccess
from backend.errors import found
from backend.uploads import register_path

router = APIRouter(prefix="/api", tags=["checkpoints"])


class PathIn(BaseModel):
    path: str = Field(description="a checkpoint folder or .safetensors file under DELTALENS_ALLOWED_ROOTS")


class FileIn(BaseModel):
    name: str
    size: int


class UploadIn(BaseModel):
    name: str = Field("checkpoint", max_length=200)
    files: list[FileIn] = Field(max_length=10_000)


@router.post("/checkpoints", status_code=201, dependencies=WriteAccess)
def register(body: PathIn, settings: SettingsDep, catalog: CatalogDep) -> dict:
    return {"id": register_path(body.path, settings, catalog)}


@router.get("/checkpoints")
def list_checkpoints(catalog: CatalogDep) -> list[dict]:
    return catalog.checkpoints()


@router.get("/checkpoints/{cid}")
def get_checkpoint(cid: str, catalog: CatalogDep) -> dict:
    return found(catalog.checkpoint(cid), "checkpoint", cid)


@router.post("/uploads", status_code=201, dependencies=WriteAccess)
def create_upload(body: UploadIn, uploads: UploadsDep) -> dict:
    return uploads.create(body.name, [f.model_dump() for f in body.files])


@router.get("/uploads/{sid}")
def upload_status(sid: str, uploads: UploadsDep) -> dict:
    return uploads.status(sid)


@router.put("/uploads/{sid}/files/{name}", dependencies=WriteAccess)
async def upload_chunk(sid: str, name: str, request: Request, uploads: UploadsDep,
                       offset: int = Query(0, ge=0, description="byte offset of this chunk in the file")) -> dict:
    """Send bytes [offset, offset+len) of one file. Resend freely: bytes already received are skipped."""
    return await uploads.write(sid, name, offset, request.stream())


@router.post("/uploads/{sid}/complete", status_code=201, dependencies=WriteAccess)
def complete_upload(sid: str, uploads: UploadsDep) -> dict:
    """Validate every file, store it by sha256 and register the checkpoint."""
    return {"id": uploads.complete(sid)}
