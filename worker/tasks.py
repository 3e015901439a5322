"""The Celery task that runs one analysis and publishes its DuckDB artifact.

Idempotent and keyed by analysis id: a redelivered task whose artifact is already published
returns at once; every start counts an attempt (in the data folder, so it survives worker and
broker restarts) and past `max_attempts` the task gives up with a reason instead of running again.
Expected failures are returned as {"status": "failed", "error": {code, message}}; the API turns
the return value into the analysis status.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from worker.celery_app import ANALYSIS_TASK, celery_app
from worker.errors import InputError
from worker.settings import get_settings


class Cancelled(Exception):
    pass


def artifact_path(analysis_id: str) -> Path:
    return get_settings().path("results") / f"{analysis_id}.duckdb"


def cancel_marker(analysis_id: str) -> Path:
    return get_settings().path("cancel") / analysis_id


def _count_attempt(analysis_id: str) -> int:
    marker = get_settings().path("attempts") / analysis_id
    attempts = int(marker.read_text() or 0) + 1 if marker.exists() else 1
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(attempts))
    os.replace(tmp, marker)
    return attempts


class _Progress:
    """Reports bytes / tensors done to the result backend (at most twice a second); stops the run
    when the analysis was cancelled."""

    def __init__(self, task, analysis_id: str, tensors_total: int):
        self.task, self.analysis_id, self.tensors_total = task, analysis_id, tensors_total
        self.started, self.last, self.tensors_done = time.time(), 0.0, -1

    def __call__(self, done: int, total: int, name: str) -> None:
        self.tensors_done += 1
        if cancel_marker(self.analysis_id).exists():
            raise Cancelled()
        now = time.time()
        if now - self.last < 0.5 and done < total:
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / done * (total - done) if done else None
        self.task.update_state(state="PROGRESS", meta={
            "progress": done / total if total else 0.0, "bytes_done": done, "bytes_total": total,
            "tensors_done": self.tensors_done, "tensors_total": self.tensors_total, "tensor": name,
            "elapsed_s": elapsed, "eta_s": eta})


@celery_app.task(name=ANALYSIS_TASK, bind=True)
def run_analysis_task(self, analysis_id: str, kind: str, paths: list[str], taus: list[float],
                      relative: bool = False, rank: bool = True) -> dict:
    from worker.analyses import Options, run_analysis
    from worker.checkpoint import open_checkpoint
    from worker.store import write_artifact

    settings = get_settings()
    artifact = artifact_path(analysis_id)
    if artifact.exists():
        return {"status": "done", "artifact": str(artifact)}
    if cancel_marker(analysis_id).exists():
        return {"status": "cancelled"}
    attempts = _count_attempt(analysis_id)
    if attempts > settings.max_attempts:
        return {"status": "failed", "error": {
            "code": "worker_lost",
            "message": f"the worker stopped {attempts - 1} times while running this analysis "
                       f"(killed or out of memory); gave up after {settings.max_attempts} attempts"}}
    try:
        tensors = len(open_checkpoint(paths[0]).names())
        options = Options(taus=taus, relative=relative, rank=rank, device=settings.device,
                          progress=_Progress(self, analysis_id, tensors))
        result = run_analysis(kind, paths, options)
        write_artifact(result, artifact, analysis_id)
    except Cancelled:
        return {"status": "cancelled"}
    except SoftTimeLimitExceeded:
        return {"status": "failed", "error": {"code": "time_limit", "message":
                f"the analysis ran longer than DELTALENS_TASK_TIME_LIMIT ({settings.task_time_limit} s)"}}
    except InputError as e:
        return {"status": "failed", "error": {"code": "invalid_checkpoint", "message": str(e)}}
    return {"status": "done", "artifact": str(artifact)}
