"""Short links: a code for a dashboard URL (path + query = the whole view state).

A link only ever leads to a path on this site. Browsers read `\\` as `/`, drop tabs and newlines
anywhere in a URL and treat `//host` as another site, so `view_path` normalises the URL the way a
browser would and refuses anything that could leave the origin — at creation, and again when a code
is followed (links stored by older versions are checked too). `short_url` is built from
`DELTALENS_PUBLIC_URL`, never from the request's Host header; without it, it is the relative
`/s/<code>`.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import unquote

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

from deltalens.backend.deps import CatalogDep, SettingsDep, WriteAccess
from deltalens.backend.errors import WRITE, ApiError, found
from deltalens.backend.models import LinkIn, LinkOut

router = APIRouter(tags=["links"])

_STRIPPED = re.compile(r"[\t\n\r]")  # the WHATWG URL parser removes these anywhere
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SLASHES = re.compile(r"^/[/\\]")  # "//host" or "/\host": another site
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")


def view_path(url: str) -> str | None:
    """`url` as a path (+ query) on this site, or None when it is not one or could leave it."""
    s = _STRIPPED.sub("", url).strip(" ")
    path, _, query = s.split("#", 1)[0].partition("?")
    path = path.replace("\\", "/")  # as browsers read a path (the query keeps its characters)
    if _CONTROL.search(s) or not path.startswith("/"):  # a scheme, a host, a relative path
        return None
    probe = path
    for _ in range(4):  # percent-encoded slashes, dots and tabs: %2F, %5C, %2e, %09 (and %252F ...)
        if _SLASHES.match(probe) or _DOT_SEGMENT.search(probe) or _CONTROL.search(probe):
            return None
        decoded = _STRIPPED.sub("", unquote(probe)).replace("\\", "/")
        if decoded == probe:
            return path + (f"?{query}" if query else "")
        probe = decoded
    return None  # encoded four times or more: nobody's view path


@router.post("/api/links", status_code=201, dependencies=WriteAccess, responses=WRITE)
def create_link(body: LinkIn, catalog: CatalogDep, settings: SettingsDep) -> LinkOut:
    path = view_path(body.url)
    if path is None:
        raise ApiError(
            422, "invalid_request", "url must be a path on this dashboard, e.g. /analyses/ab12?tau=1e-4"
        )
    # 128 random bits: a code says nothing about its view and cannot be guessed or enumerated
    code = catalog.link_code(path) or catalog.add_link(secrets.token_urlsafe(16), path)
    public = settings.public_url.rstrip("/")
    return LinkOut(code=code, url=path, short_url=f"{public}/s/{code}")


@router.get("/s/{code}", include_in_schema=False)
def follow_link(code: str, catalog: CatalogDep) -> RedirectResponse:
    path = view_path(found(catalog.link(code), "short link", code))
    if path is None:  # stored before links were checked this way: never leave the site
        raise ApiError(404, "not_found", f"short link {code} does not lead to a view on this dashboard")
    return RedirectResponse(path, status_code=307)
