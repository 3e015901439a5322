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
    max_metadata_bytes: int = Field(
        8 << 20, description="largest JSON metadata file (config.json, index, adapter config) of an upload"
    )
    max_body_bytes: int = Field(
        1 << 20, description="largest JSON request body (upload chunks: max_upload_bytes; new uploads: 4 MiB)"
    )
    max_upload_sessions: int = Field(
        32, description="unfinished upload sessions one client (IP address) may hold at once; 0: no limit"
    )
    upload_session_ttl: int = Field(
        24 * 3600, description="seconds without a byte received after which an unfinished upload is removed"
    )
    upload_read_timeout: float = Field(
        120.0, description="seconds an upload chunk may go without sending a byte before it is dropped"
    )
    task_time_limit: int = Field(6 * 3600, description="seconds one analysis may run")
    max_attempts: int = Field(3, description="deliveries of one analysis before it is marked failed")
    sweep_interval: float = Field(
        60.0,
        description="seconds between the API's sweeps of what finished or deleted analyses left behind "
        "(cancel markers, attempt counters, parts, task states, unpublished artifacts)",
    )
    fanout: int = Field(
        0,
        description="split an analysis (pair, series, overlap) of a sharded base into up to this many tasks "
        "(shard groups) for several workers, merged by a chord; 0 or 1: one task",
    )
    device: str = Field("auto", description="analysis device for workers: auto | cpu | cuda")
    mask_jobs_per_minute: int = Field(
        10, description="mask export jobs one client (IP address) may create per minute; 0: no limit"
    )
    public_url: str = Field(
        "", description="base URL of the dashboard for absolute short links (default: relative /s/<code>)"
    )

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
