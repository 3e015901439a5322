"""The dashboard's static files (backend/static.py): each asset in the first encoding the browser
accepts (precompressed .br/.gz copies) or as is, hashed assets cached for good, index.html
revalidated, the strict CSP kept; and the build (frontend/vite.config.ts): a .br/.gz copy of every
asset, the views split into chunks, a partial Plotly. No browser: tests/test_dashboard.py draws it."""

from __future__ import annotations

import gzip
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from service import ROOT

from deltalens.backend.app import serve_dashboard
from deltalens.backend.errors import install_handlers
from deltalens.backend.headers import SecurityHeaders

RAW = b"export const x = 'deltalens';\n" * 200
COPIES = {"br": b"brotli bytes stand-in", "gzip": gzip.compress(RAW)}  # httpx decodes gzip, not br here
BUILT = ROOT / "backend" / "dashboard"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    (folder / "assets").mkdir()
    (folder / "index.html").write_text(
        '<!doctype html><script type="module" src="/assets/app-1a2b.js"></script>'
    )
    (folder / "assets" / "app-1a2b.js").write_bytes(RAW)
    (folder / "assets" / "app-1a2b.js.br").write_bytes(COPIES["br"])
    (folder / "assets" / "app-1a2b.js.gz").write_bytes(COPIES["gzip"])
    (folder / "assets" / "tiny-3c4d.css").write_bytes(b"a{}")  # too small to compress: no copies
    app = FastAPI()
    install_handlers(app)
    app.add_middleware(SecurityHeaders)
    serve_dashboard(app, folder)
    return TestClient(app)


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip, deflate, br, zstd", "br"),  # Chromium
        ("gzip, deflate", "gzip"),
        ("br;q=0, gzip", "gzip"),
        ("*", "br"),
        ("*;q=0.5, br;q=0", "gzip"),
        ("GZIP", "gzip"),
        ("gzip;q=0", None),
        ("gzip;q=nonsense", None),
        ("identity", None),
        ("", None),
    ],
)
def test_an_asset_comes_in_the_first_encoding_the_client_accepts(client, accept, coding):
    r = client.get("/assets/app-1a2b.js", headers={"accept-encoding": accept})
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == coding
    assert r.content == (RAW if coding in (None, "gzip") else COPIES[coding])  # gzip decoded by httpx
    assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["vary"].lower() == "accept-encoding"


def test_headers_of_assets_and_pages(client):
    css = client.get("/assets/tiny-3c4d.css", headers={"accept-encoding": "br, gzip"})
    assert css.content == b"a{}" and "content-encoding" not in css.headers and "vary" not in css.headers
    assert css.headers["content-type"].startswith("text/css")
    head = client.head("/assets/app-1a2b.js", headers={"accept-encoding": "gzip"})
    assert head.status_code == 200 and head.headers["content-length"] == str(len(COPIES["gzip"]))
    for path in ("/", "/analyses/x", "/index.html"):  # the SPA shell: asked again on every load
        page = client.get(path)
        assert page.status_code == 200 and page.headers["cache-control"] == "no-cache", path
        assert "script-src 'self';" in page.headers["content-security-policy"]
    assert "script-src 'self';" in client.get("/assets/app-1a2b.js").headers["content-security-policy"]


@pytest.mark.parametrize("path", ["/assets/nope.js", "/assets/app-1a2b.js.br", "/assets/app-1a2b.js.gz"])
def test_only_the_assets_themselves_are_served(client, path):
    r = client.get(path, headers={"accept-encoding": "br, gzip"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_the_build_is_split_compressed_and_carries_a_partial_plotly():
    if not (BUILT / "index.html").is_file():
        pytest.skip("dashboard not built (make builds it)")
    index = (BUILT / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", index)  # no inline script (CSP: script-src 'self')
    scripts = sorted((BUILT / "assets").glob("*.js"), key=lambda p: p.stat().st_size)
    (entry,) = [p for p in scripts if f"/assets/{p.name}" in index]
    assert entry.stat().st_size < 64 * 1024, "the views and Plotly load as chunks, not in the entry"
    assert len(scripts) >= 8  # a chunk per view, Plotly one of its own
    plotly = scripts[-1]
    assert "plotly" in plotly.name and plotly.stat().st_size < 2 * 1024 * 1024  # the full bundle is 4.6 MB
    for asset in [*scripts, *(BUILT / "assets").glob("*.css")]:
        raw = asset.read_bytes()  # every asset compresses (a few bytes might not: none is that small)
        assert gzip.decompress(asset.with_name(asset.name + ".gz").read_bytes()) == raw
        assert asset.with_name(asset.name + ".br").stat().st_size < len(raw)
