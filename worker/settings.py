"""The one settings class, read from DELTALENS_* environment variables (torch-free; shared by the
API and the workers)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DELTALENS_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("./deltalens-data"), description="blobs, checkpoints, results, catalog")
    broker_url: str = Field(
        "redis://localhost:6379/0", description="Celery broker; 'filesystem://' needs no server"
    )
    result_backend: str = Field(
        "redis://localhost:6379/1", description="Celery result backend (task progress)"
    )
    queue: str = Field("gpu", description="queue the analysis tasks go to and workers listen on")
    token: str | None = Field(None, description="hosted mode: bearer token required by every write endpoint")
    allowed_roots: str = Field(
        "", description="':'-separated folders whose checkpoints may be registered by path"
    )
    allow_pickle: bool = Field(
        False, description="accept .bin/.pt uploads (read only with torch.load(weights_only=True))"
    )
    max_upload_bytes: int = Field(64 << 30, description="largest single file an upload may declare")
    max_header_bytes: int = Field(16 << 20, description="largest safetensors header accepted from an upload")
    task_time_limit: int = Field(6 * 3600, description="seconds one analysis may run")
    max_attempts: int = Field(3, description="deliveries of one analysis before it is marked failed")
    fanout: int = Field(
        0,
        description="split a pair analysis of a sharded checkpoint into up to this many tasks "
        "(shard groups) for several workers, merged by a chord; 0 or 1: one task",
    )
    device: str = Field("auto", description="analysis device for workers: auto | cpu | cuda")
    public_url: str = Field("", description="base URL used in short links (default: the request's)")

    @property
    def roots(self) -> list[Path]:
        return [Path(p).resolve() for p in self.allowed_roots.split(":") if p]

    def path(self, *parts: str) -> Path:
        target = self.data_dir.joinpath(*parts)
        target.mkdir(parents=True, exist_ok=True)
        return target


@lru_cache
def get_settings() -> Settings:
    return Settings()
