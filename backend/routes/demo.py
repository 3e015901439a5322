"""`GET /api/demo`: the progress of the demo training that `deltalens up --demo DIR` runs meanwhile.

The trainer (worker/demo.py, a child of `up`) replaces DIR/status.json atomically; this route only
reads it. `up` names DIR in DELTALENS_DEMO_DIR; without it no demo is served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import APIRouter

from deltalens.backend.models import DemoStatus

router = APIRouter(tags=["meta"])


def demo_status(folder: Path | None) -> DemoStatus:
    if folder is None:
        return DemoStatus(state="none")
    try:
        return DemoStatus.model_validate(json.loads((folder / "status.json").read_text()))
    except (OSError, ValueError):  # not written yet (or a folder trained by an older version)
        return DemoStatus(state="done" if (folder / "log.json").is_file() else "starting")


@router.get("/api/demo", response_model=DemoStatus)
def demo() -> DemoStatus:
    """How the demo's training stands: stage, step, the figure it reached, ETA."""
    folder = os.environ.get("DELTALENS_DEMO_DIR")
    return demo_status(Path(folder) if folder else None)
