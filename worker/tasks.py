"""The Celery task that runs one analysis and publishes its DuckDB artifact.

Idempotent and keyed by analysis id: a redelivered task whose artifact is already published
returns at once; every start counts an attempt (in the data folder, so it survives worker and
broker restarts) and past `max_attempts` the task gives up with a reason instead of running again.
Expected failures are returned as {"status": "failed", "error": {code, message}}; the API turns
the return value into the analysis status.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from deltalens.worker.celery_app import ANALYSIS_TASK, MERGE_TASK, PART_TASK, celery_app
from deltalens.worker.errors import InputError
from deltalens.worker.settings import get_settings


class Cancelled(Exception):
    pass


def artifact_path(analysis_id: str) -> Path:
    return get_settings().path("results") / f"{analysis_id}.duckdb"


def cancel_marker(analysis_id: str) -> Path:
    return get_settings().path("cancel") / analysis_id


def parts_folder(analysis_id: str) -> Path:
    return get_settings().path("results", f"{analysis_id}.parts")


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
        self.task.update_state(
            state="PROGRESS",
            meta={
                "progress": done / total if total else 0.0,
                "bytes_done": done,
                "bytes_total": total,
                "tensors_done": self.tensors_done,
                "tensors_total": self.tensors_total,
                "tensor": name,
                "elapsed_s": elapsed,
                "eta_s": eta,
            },
        )


def _attempt(key: str) -> dict | None:
    """Count one more start of `key`; past the cap, the reason to give up."""
    settings = get_settings()
    attempts = _count_attempt(key)
    if attempts > settings.max_attempts:
        return {
            "status": "failed",
            "error": {
                "code": "worker_lost",
                "message": f"the worker stopped {attempts - 1} times while running this analysis "
                f"(killed or out of memory); gave up after {settings.max_attempts} attempts",
            },
        }
    return None


def _run(task, analysis_id: str, kind: str, paths: list[str], opts, publish) -> dict:
    """Run the analysis with progress and cancellation; `publish(result)` stores it. Expected
    failures come back as {"status": "failed" | "cancelled", ...}."""
    from deltalens.worker.analyses import run_analysis
    from deltalens.worker.checkpoint import open_checkpoint

    settings = get_settings()
    try:
        tensors = len(opts.names) if opts.names is not None else len(open_checkpoint(paths[0]).names())
        opts.progress = _Progress(task, analysis_id, tensors)
        publish(run_analysis(kind, paths, opts))
    except Cancelled:
        return {"status": "cancelled"}
    except SoftTimeLimitExceeded:
        return {
            "status": "failed",
            "error": {
                "code": "time_limit",
                "message": "the analysis ran longer than DELTALENS_TASK_TIME_LIMIT "
                f"({settings.task_time_limit} s)",
            },
        }
    except InputError as e:
        return {"status": "failed", "error": {"code": "invalid_checkpoint", "message": str(e)}}
    return {"status": "done"}


def _options(taus, relative, rank, names=None):
    from deltalens.worker.analyses import Options

    return Options(taus=taus, relative=relative, rank=rank, device=get_settings().device, names=names)


@celery_app.task(name=ANALYSIS_TASK, bind=True)
def run_analysis_task(
    self,
    analysis_id: str,
    kind: str,
    paths: list[str],
    taus: list[float],
    relative: bool = False,
    rank: bool = True,
) -> dict:
    from deltalens.worker.store import write_artifact

    artifact = artifact_path(analysis_id)
    if artifact.exists():
        return {"status": "done", "artifact": str(artifact)}
    if cancel_marker(analysis_id).exists():
        return {"status": "cancelled"}
    if gave_up := _attempt(analysis_id):
        return gave_up
    outcome = _run(
        self,
        analysis_id,
        kind,
        paths,
        _options(taus, relative, rank),
        lambda result: write_artifact(result, artifact, analysis_id),
    )
    return {**outcome, "artifact": str(artifact)} if outcome["status"] == "done" else outcome


# --- scale-out: one task per shard group, merged by a chord callback ------------------------------
def _plain(x):
    """JSON for NumPy values in a part's details (float64 -> float is exact)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    raise TypeError(f"cannot store a {type(x).__name__} in a part")


@celery_app.task(name=PART_TASK, bind=True)
def run_part_task(
    self,
    analysis_id: str,
    part: int,
    paths: list[str],
    names: list[str],
    taus: list[float],
    relative: bool = False,
    rank: bool = True,
) -> dict:
    """One shard group of a pair analysis: its per-matrix details, in results/<id>.parts/<part>.json."""
    out = parts_folder(analysis_id) / f"{part}.json"
    if out.exists():
        return {"status": "done", "part": part}
    if cancel_marker(analysis_id).exists():
        return {"status": "cancelled"}
    if gave_up := _attempt(f"{analysis_id}.{part}"):
        return gave_up
    started = time.time()

    def publish(result) -> None:
        record = {
            "details": result.details,
            "skipped": result.document["skipped"],
            "family": result.family,
            "device": result.device,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "seconds": time.time() - started,
        }
        tmp = out.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, default=_plain))
        os.replace(tmp, out)  # a part is there whole or not at all

    return {
        **_run(self, analysis_id, "pair", paths, _options(taus, relative, rank, names), publish),
        "part": part,
    }


@celery_app.task(name=MERGE_TASK)
def merge_parts_task(
    outcomes: list[dict],
    analysis_id: str,
    paths: list[str],
    taus: list[float],
    relative: bool = False,
    rank: bool = True,
) -> dict:
    """Chord callback: the parts' details in tensor order -> the same artifact one worker would publish."""
    from deltalens.worker.analyses import pair_result
    from deltalens.worker.checkpoint import open_checkpoint
    from deltalens.worker.store import write_artifact

    artifact = artifact_path(analysis_id)
    if artifact.exists():
        return {"status": "done", "artifact": str(artifact)}
    for outcome in outcomes:
        if outcome["status"] != "done":
            return outcome
    parts = [
        json.loads((parts_folder(analysis_id) / f"{o['part']}.json").read_text())
        for o in sorted(outcomes, key=lambda o: o["part"])
    ]
    order = {n: i for i, n in enumerate(parts[0]["order"])} if "order" in parts[0] else None
    order = {name: i for i, name in enumerate(open_checkpoint(paths[0]).names())}  # the one-pass order
    details = sorted((d for p in parts for d in p["details"]), key=lambda d: order[d["row"]["source"]])
    result = pair_result(
        paths[0],
        paths[1],
        _options(taus, relative, rank),
        details,
        parts[0]["skipped"],
        parts[0]["family"],
        parts[0]["device"],
    )
    write_artifact(result, artifact, analysis_id)
    shutil.rmtree(parts_folder(analysis_id), ignore_errors=True)
    return {
        "status": "done",
        "artifact": str(artifact),
        "parts": [
            {"worker": p["worker"], "seconds": round(p["seconds"], 3), "matrices": len(p["details"])}
            for p in parts
        ],
    }
