"""The FastAPI application: thin routes over the catalog, uploads and jobs."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from backend.catalog import Catalog
from backend.errors import install_handlers
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
    for module in (checkpoints, analyses, links):
        app.include_router(module.router)

    @app.get("/api/health", tags=["meta"])
    def health() -> dict:
        return {"status": "ok"}

    if FRONTEND.is_dir():
        app.mount("/", StaticFiles(directory=FRONTEND, html=True), name="frontend")
    return app


app = create_app()
