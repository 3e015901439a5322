"""FastAPI dependencies: the app's settings, catalog, uploads, jobs, and the write token."""

from __future__ import annotations

import hmac
import threading
from typing import Annotated

from fastapi import Depends, Header, Request

from deltalens.backend.catalog import Catalog
from deltalens.backend.downloads import Downloads
from deltalens.backend.errors import ApiError
from deltalens.backend.jobs import Jobs
from deltalens.backend.uploads import Uploads
from deltalens.worker.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


def get_uploads(request: Request) -> Uploads:
    return request.app.state.uploads


_DOWNLOADS = threading.Lock()


def get_downloads(request: Request) -> Downloads:
    """Hub downloads: made on first use, so that no thread runs until one is asked for."""
    state = request.app.state
    with _DOWNLOADS:
        if getattr(state, "downloads", None) is None:
            state.downloads = Downloads(state.settings, state.catalog)
        return state.downloads


def require_token(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Hosted mode (DELTALENS_TOKEN set): writes need `Authorization: Bearer <token>`."""
    if not settings.token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.token.encode()):
        raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'")


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
UploadsDep = Annotated[Uploads, Depends(get_uploads)]
DownloadsDep = Annotated[Downloads, Depends(get_downloads)]
WriteAccess = [Depends(require_token)]
