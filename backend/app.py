"""The FastAPI application: thin routes over the catalog, uploads and jobs."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, install_handlers
from deltalens.backend.headers import SecurityHeaders
from deltalens.backend.jobs import Jobs
from deltalens.backend.limits import BodyLimits
from deltalens.backend.models import Health
from deltalens.backend.routes import analyses, checkpoints, demo, links
from deltalens.backend.static import REVALIDATE, Assets
from deltalens.backend.uploads import Uploads
from deltalens.worker.celery_app import make_celery
from deltalens.worker.settings import Settings, get_settings

BUILD_COMMAND = "cd frontend && npm ci && npm run build"


def dashboard_folder() -> Path | None:
    """The built dashboard, shipped in the package as data (`deltalens/backend/dashboard`)."""
    folder = Path(str(resources.files("deltalens.backend") / "dashboard"))
    return folder if (folder / "index.html").is_file() else None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        catalog = Catalog(settings.path() / "catalog.duckdb")
        app.state.settings, app.state.catalog = settings, catalog
        app.state.uploads = Uploads(settings, catalog)
        app.state.jobs = Jobs(settings, catalog, make_celery(settings))
        app.state.jobs.follow()
        yield
        app.state.jobs.stop()
        catalog.close()

    app = FastAPI(
        title="deltalens",
        version="0.1.0",
        lifespan=lifespan,
        description="What did fine-tuning change? Checkpoints in, per-tensor change metrics out.",
    )
    install_handlers(app)
    app.add_middleware(BodyLimits, settings=settings)  # the token and body size, before any body is read
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, BodyLimits' refusals included
    for module in (checkpoints, analyses, links, demo):
        app.include_router(module.router)

    folder = dashboard_folder()

    @app.get("/api/health", tags=["meta"], response_model=Health)
    def health() -> Health:
        return Health(status="ok", dashboard=folder is not None)

    serve_dashboard(app, folder)
    return app


MISSING = f"""<!doctype html><meta charset="utf-8"><title>deltalens: dashboard not built</title>
<h1>The deltalens dashboard is not built</h1>
<p>The API works (<a href="/docs">/docs</a>), but this installation has no built dashboard.
Build it from a clone of the repository with <code>{BUILD_COMMAND}</code>, or install a wheel
(<code>pip wheel .</code> builds it into the package).</p>"""


def serve_dashboard(app: FastAPI, folder: Path | None) -> None:
    """The built dashboard: its assets (precompressed, cached for good: backend/static.py), and
    index.html (revalidated each load) for every view path (the SPA routes itself)."""
    index = (folder / "index.html").read_text() if folder else MISSING
    assets = Assets(folder / "assets") if folder and (folder / "assets").is_dir() else None

    @app.api_route("/assets/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str, request: Request) -> Response:
        found = assets and assets.response(name, request.headers.get("accept-encoding", ""))
        if not found:
            raise ApiError(404, "not_found", f"no asset {name}")
        return found

    @app.get("/{path:path}", include_in_schema=False)
    def dashboard(path: str) -> Response:
        if path.startswith("api/"):
            raise ApiError(404, "not_found", f"no endpoint /{path}")
        if folder is None:
            return HTMLResponse(MISSING, status_code=503, headers=REVALIDATE)
        file = (folder / path).resolve()
        if path and folder in file.parents and file.is_file():
            return FileResponse(file, headers=REVALIDATE)
        return HTMLResponse(index, headers=REVALIDATE)


app = create_app()
