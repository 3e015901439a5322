"""Every JSON shape the API answers with: the pydantic response models, in one place."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(description="'ok' while the API serves")
    dashboard: bool = Field(description="whether this installation carries the built dashboard")
