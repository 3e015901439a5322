"""Short links: a code for a dashboard URL (path + query = the whole view state)."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from deltalens.backend.deps import CatalogDep, WriteAccess
from deltalens.backend.errors import WRITE, ApiError, found
from deltalens.backend.models import LinkIn, LinkOut

router = APIRouter(tags=["links"])


@router.post("/api/links", status_code=201, dependencies=WriteAccess, responses=WRITE)
def create_link(body: LinkIn, request: Request, catalog: CatalogDep) -> LinkOut:
    parts = urlsplit(body.url)
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        raise ApiError(
            422, "invalid_request", "url must be a path on this dashboard, e.g. /analyses/ab12?tau=1e-4"
        )
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    # 128 random bits: a code says nothing about its view and cannot be guessed or enumerated
    code = catalog.link_code(path) or catalog.add_link(secrets.token_urlsafe(16), path)
    return LinkOut(code=code, url=path, short_url=str(request.base_url).rstrip("/") + f"/s/{code}")


@router.get("/s/{code}", include_in_schema=False)
def follow_link(code: str, catalog: CatalogDep) -> RedirectResponse:
    return RedirectResponse(found(catalog.link(code), "short link", code), status_code=307)
