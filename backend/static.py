"""The built dashboard's static files: precompressed assets and cache headers.

Vite names every file under assets/ by its content hash, so those are cached for a year as immutable;
index.html (and any other file without a hash) is revalidated on every load (`no-cache`), so a new
build shows at once. The build writes `.br` and `.gz` copies beside each asset (frontend/vite.config.ts);
the first one the client accepts is sent with its Content-Encoding (`Vary: Accept-Encoding` keeps
shared caches apart), else the file itself. The assets are a table made once from the folder: a
request names a key of it, never a path, so nothing outside the folder (or a `.br` file by its own
name) can be asked for.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi.responses import FileResponse

ENCODINGS = {"br": ".br", "gzip": ".gz"}  # content coding -> the build's file suffix, preferred first
IMMUTABLE = {"cache-control": "public, max-age=31536000, immutable"}
REVALIDATE = {"cache-control": "no-cache"}  # index.html: asked again each load (304s are cheap)


def accepted(header: str) -> dict[str, float]:
    """Accept-Encoding as {coding: q} (RFC 9110 12.5.3); a malformed q counts as 0 (not acceptable)."""
    out = {}
    for part in filter(None, (p.strip() for p in header.lower().split(","))):
        coding, _, params = (s.strip() for s in part.partition(";"))
        try:
            out[coding] = float(params.removeprefix("q=")) if params.startswith("q=") else 1.0
        except ValueError:
            out[coding] = 0.0
    return out


def choose(header: str, available: dict[str, Path]) -> str | None:
    """The first of `available`'s codings the client accepts (explicitly or by `*`), or None: identity."""
    q = accepted(header)
    return next((c for c in available if q.get(c, q.get("*", 0.0)) > 0), None)


class Assets:
    """Every file under assets/ with its precompressed copies: {name: (file, {coding: copy})}."""

    def __init__(self, folder: Path):
        files = {p.name: p for p in folder.iterdir() if p.is_file()}
        copies = tuple(ENCODINGS.values())
        self.table = {
            name: (path, {c: files[name + s] for c, s in ENCODINGS.items() if name + s in files})
            for name, path in files.items()
            if not name.endswith(copies)
        }

    def response(self, name: str, accept_encoding: str) -> FileResponse | None:
        """The asset in the best encoding the client takes, cached for a year; None: no such asset."""
        if name not in self.table:
            return None
        file, variants = self.table[name]
        coding = choose(accept_encoding, variants)
        headers = {**IMMUTABLE, **({"vary": "accept-encoding"} if variants else {})}
        if coding:
            file, headers["content-encoding"] = variants[coding], coding
        return FileResponse(file, media_type=mimetypes.guess_type(name)[0], headers=headers)
