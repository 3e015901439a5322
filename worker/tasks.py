"""The Celery task that runs one analysis and publishes its DuckDB artifact.

Idempotent and keyed by analysis id: a redelivered task whose artifact is already published
returns at once; every start counts an attempt (in the data folder, so it survives worker and
broker restarts) and past `max_attempts` the task gives up with a reason instead of running again.
Expected failures are returned as {"status": "failed", "error": {code, message}}; the API turns
the return value into the analysis status.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from deltalens.worker.celery_app import ANALYSIS_TASK, MASK_TASK, MERGE_TASK, PART_TASK, celery_app
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
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")  # parts of one analysis count side by side
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


def confinement(paths: list[str], pins: list[dict | None] | None = None):
    """The context every checkpoint is opened in here: each file the reader opens must resolve inside
    DELTALENS_ALLOWED_ROOTS or the data folder's checkpoints/ (no symlink out), and each checkpoint
    with a pin (recorded by the API at registration, sent along with the task, same order as
    `paths`) must still hold the files, sizes and mtimes it was validated with."""
    from deltalens.worker.checkpoint import confined

    settings = get_settings()
    return confined([*settings.roots, settings.path("checkpoints")], dict(zip(paths, pins or [])))


def input_failure(e: InputError) -> dict:
    """A refused checkpoint as a task outcome: its own code (path_not_allowed, checkpoint_changed)
    or invalid_checkpoint, and the one-line reason naming the file."""
    return {
        "status": "failed",
        "error": {"code": getattr(e, "code", "invalid_checkpoint"), "message": str(e)},
    }


def _run(task, analysis_id: str, kind: str, paths: list[str], opts, publish, pins=None) -> dict:
    """Run the analysis with progress and cancellation; `publish(result)` stores it. Expected
    failures come back as {"status": "failed" | "cancelled", ...}."""
    from deltalens.worker.analyses import run_analysis
    from deltalens.worker.checkpoint import open_checkpoint

    settings = get_settings()
    try:
        with confinement(paths, pins):  # pins are checked as each checkpoint is opened, before any tensor
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
        return input_failure(e)
    except Exception as e:  # a bug, the disk, memory: a readable reason here, the traceback in the log
        logging.getLogger("deltalens.tasks").exception("analysis %s failed", analysis_id)
        return {"status": "failed", "error": {"code": "worker_error", "message": unexpected(e, "analysis")}}
    return {"status": "done"}


def unexpected(e: Exception, what: str) -> str:
    """A failure nobody planned for, in words: never the exception's own text (it may hold paths,
    SQL or values from the file); its type name lets the worker's log be searched."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the data volume is full; free space, then run the {what} again"
    if isinstance(e, MemoryError):
        return f"the worker ran out of memory during the {what}"
    return f"the {what} stopped on an unexpected error ({type(e).__name__}); the worker's log has the details"


def _options(taus, relative, rank, names=None, unstored=False, geometry=True):
    from deltalens.worker.analyses import Options

    device = get_settings().device
    return Options(
        taus=taus,
        relative=relative,
        rank=rank,
        device=device,
        names=names,
        unstored=unstored,
        geometry=geometry,
    )


@celery_app.task(name=ANALYSIS_TASK, bind=True)
def run_analysis_task(
    self,
    analysis_id: str,
    kind: str,
    paths: list[str],
    taus: list[float],
    relative: bool = False,
    rank: bool = True,
    pins: list[dict | None] | None = None,
    geometry: bool = True,
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
        _options(taus, relative, rank, geometry=geometry),
        lambda result: write_artifact(result, artifact, analysis_id),
        pins,
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
    pins: list[dict | None] | None = None,
    geometry: bool = True,
    kind: str = "pair",  # last, with a default: parts queued before series and overlap fanned out
) -> dict:
    """One shard group of an analysis: its per-matrix details, in results/<id>.parts/<part>.json."""
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
            "notes": result.document["notes"],
            "family": result.family,
            "device": result.device,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "seconds": time.time() - started,
        }
        tmp = out.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, default=_plain))
        os.replace(tmp, out)  # a part is there whole or not at all

    return {
        # part 0 also takes the heads the base does not store (read through its tied embedding)
        **_run(
            self,
            analysis_id,
            kind,
            paths,
            _options(taus, relative, rank, names, part == 0, geometry),
            publish,
            pins,
        ),
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
    pins: list[dict | None] | None = None,
    geometry: bool = True,
    kind: str = "pair",
) -> dict:
    """Chord callback: the parts' details in tensor order -> the same artifact one worker would publish."""
    from deltalens.worker import adapters
    from deltalens.worker.analyses import RESULTS, Made
    from deltalens.worker.checkpoint import open_checkpoints
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
    opts = _options(taus, relative, rank)
    try:
        with confinement(paths, pins):
            checkpoints = open_checkpoints(paths)
            order = {name: i for i, name in enumerate(checkpoints[0].names())}  # the one-pass order
            details = sorted(  # the heads only a target stores come last, as in one pass
                (d for p in parts for d in p["details"]),
                key=lambda d: order.get(d["row"]["source"], len(order)),
            )
            first = parts[0]
            made = Made(first["skipped"], first["family"], first["device"], first.get("notes") or [])
            result = RESULTS[kind](paths, opts, details, made)
            if kind == "pair":  # exact ΔW of LoRA inputs, as analyze_pair adds them
                adapters.annotate(result.document, checkpoints, opts.taus, opts.relative)
    except InputError as e:
        return input_failure(e)
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


# --- update-mask export: one file per (analysis, run, τ, mode, format), computed here, never in the API ---
@celery_app.task(name=MASK_TASK, bind=True)
def export_mask_task(
    self,
    analysis_id: str,
    mask_id: str,
    base_path: str,
    target_path: str,
    tau: float,
    relative: bool = False,
    packed: bool = False,
    pins: list[dict | None] | None = None,
) -> dict:
    """Write masks/<analysis>/<mask>.safetensors (published by rename), or <mask>.error.json with a
    readable reason. The checkpoints are opened confined and checked against their pins, as for an
    analysis. Idempotent: a published file is kept; a withdrawn request (its analysis deleted) is not
    run."""
    from deltalens.worker.mask_export import MaskFiles, write_json, write_mask

    settings = get_settings()
    files = MaskFiles(settings.data_dir / "masks" / analysis_id, mask_id)
    if files.file.exists():
        return {"status": "done", "size": files.file.stat().st_size}
    if not files.request.exists():
        return {"status": "cancelled"}

    key = self.request.id or f"mask-{mask_id}"  # the task id: a new request counts from 1 again
    counter = settings.path("attempts") / key

    def fail(error: dict) -> dict:
        if files.request.exists():  # else the analysis was deleted meanwhile: leave nothing behind
            write_json(files.error, error)
        counter.unlink(missing_ok=True)  # a final answer: no redelivery left to count
        return {"status": "failed", "error": error}

    attempts = _count_attempt(key)
    if attempts > settings.max_attempts:
        return fail(
            {
                "code": "worker_lost",
                "message": f"the worker stopped {attempts - 1} times while exporting this mask (killed or "
                f"out of memory); gave up after {settings.max_attempts} attempts",
            }
        )
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.time() - last[0] >= 0.5 or done == total:
            last[0] = time.time()
            self.update_state(state="PROGRESS", meta={"progress": done / total, "tensors_done": done})

    try:
        with confinement([base_path, target_path], pins):
            size = write_mask(base_path, target_path, tau, relative, packed, files.file, progress)
        counter.unlink(missing_ok=True)
    except InputError as e:
        return fail(input_failure(e)["error"])
    except SoftTimeLimitExceeded:
        return fail(
            {
                "code": "time_limit",
                "message": "the mask export ran longer than DELTALENS_TASK_TIME_LIMIT "
                f"({settings.task_time_limit} s)",
            }
        )
    except Exception as e:  # a bug, the disk, memory: a readable reason here, the traceback in the log
        if not files.request.exists():
            return {"status": "cancelled"}
        logging.getLogger("deltalens.tasks").exception("mask %s of analysis %s failed", mask_id, analysis_id)
        return fail({"code": "worker_error", "message": unexpected(e, "mask export")})
    return {"status": "done", "size": size}
