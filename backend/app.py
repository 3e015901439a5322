"""The FastAPI application: thin routes over the catalog, uploads and jobs."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from backend.catalog import Catalog
from backend.errors import ApiError, install_handlers
from backend.headers import SecurityHeaders
from backend.jobs import Jobs
from backend.routes import analyses, checkpoints, links
from backend.uploads import Uploads
from worker.celery_app import make_celery
from worker.settings import Settings, get_settings

FRONTEND = Path(__file__).resolve().parents[1] / "frontend" / "dist"


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

    app = FastAPI(title="deltalens", version="0.1.0", lifespan=lifespan,
                  description="What did fine-tuning change? Checkpoints in, per-tensor change metrics out.")
    install_handlers(app)
    app.add_middleware(SecurityHeaders)
    for module in (checkpoints, analyses, links):
        app.include_router(module.router)

    @app.get("/api/health", tags=["meta"])
    def health() -> dict:
        return {"status": "ok"}

    if (FRONTEND / "index.html").is_file():
        serve_dashboard(app)
    return app


def serve_dashboard(app: FastAPI) -> None:
    """The built dashboard: its assets, and index.html for every view path (the SPA routes itself)."""
    app.mount("/assets", StaticFiles(directory=FRONTEND / "assets"), name="assets")
    index = (FRONTEND / "index.html").read_text()

    @app.get("/{path:path}", include_in_schema=False)
    def dashboard(path: str) -> Response:
        if path.startswith("api/"):
            raise ApiError(404, "not_found", f"no endpoint /{path}")
        file = (FRONTEND / path).resolve()
        if path and FRONTEND in file.parents and file.is_file():
            return FileResponse(file)
        return HTMLResponse(index)


app = create_app()
