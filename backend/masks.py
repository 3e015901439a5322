"""Update-mask export jobs (API side): create, follow, download — the API never computes a mask.

A mask is named by (analysis, run, τ, mode, format): the same request gives the same id, so a mask
is computed once and then served from `masks/<analysis>/<mask>.safetensors` in the data folder. The
API writes the request (`<mask>.json`, with the Celery task id) and sends `deltalens.export_mask` by
name; a worker writes the file chunk by chunk and publishes it by rename, or writes
`<mask>.error.json` with a readable reason (see `deltalens.worker.mask_export`). The status is read
from those files and, while neither exists, from the result backend. Reading checkpoints (a pickled
`.bin` needs torch) happens only in the worker.

Creating a job is a write (the token in hosted mode) and is rate-limited per client; a failed mask
can be created again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from celery import Celery

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, not_found
from deltalens.backend.models import ErrorOut, MaskIn, MaskOut
from deltalens.worker.celery_app import MASK_TASK
from deltalens.worker.mask_export import MaskFiles, write_json
from deltalens.worker.settings import Settings

MASK_ID = re.compile(r"^[0-9a-f]{16}$")
WINDOW_S = 60.0


class RateLimit:
    """At most `per_minute` events per client in any 60 s (sliding window); 0 means no limit."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._events: dict[str, deque[float]] = {}

    def take(self, client: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            for key in [k for k, q in self._events.items() if not q or now - q[-1] >= WINDOW_S]:
                del self._events[key]  # forget idle clients: memory stays O(active clients)
            events = self._events.setdefault(client, deque())
            while events and now - events[0] >= WINDOW_S:
                events.popleft()
            if len(events) >= self.per_minute:
                wait = math.ceil(WINDOW_S - (now - events[0]))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"at most {self.per_minute} mask exports per minute per client; retry in {wait} s",
                )
            events.append(now)


_create_lock = threading.Lock()  # one request file per mask, even for simultaneous identical POSTs


def mask_id(analysis_id: str, run: int, tau: float, relative: bool, fmt: str) -> str:
    key = json.dumps([analysis_id, run, repr(float(tau)), bool(relative), fmt])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Masks:
    def __init__(self, settings: Settings, catalog: Catalog, celery: Celery, limit: RateLimit):
        self.settings, self.catalog, self.celery, self.limit = settings, catalog, celery, limit

    def _job(self, aid: str) -> dict:
        job = self.catalog.job(aid)
        if job is None:
            raise not_found("analysis", aid)
        return job

    def _files(self, aid: str, mid: str) -> MaskFiles:
        if not MASK_ID.match(mid):
            raise not_found("mask", mid)
        return MaskFiles(self.settings.data_dir / "masks" / aid, mid)

    def create(self, aid: str, body: MaskIn, client: str) -> MaskOut:
        job = self._job(aid)
        if job["status"] != "done":
            raise ApiError(
                409, "not_ready", f"analysis {aid} is {job['status']}; masks are exported from done analyses"
            )
        ids = job["checkpoints"]
        if not -len(ids) < body.run < len(ids) or body.run % len(ids) == 0:
            raise ApiError(
                422, "invalid_request", f"run must pick one of the {len(ids) - 1} checkpoints after the base"
            )
        run = body.run % len(ids)
        base, target = self.catalog.checkpoint(ids[0]), self.catalog.checkpoint(ids[run])
        if base is None or target is None:
            raise ApiError(409, "checkpoint_gone", "a checkpoint of this analysis is no longer registered")
        tau = float(job["taus"][0] if body.tau is None else body.tau)
        relative = bool(job["relative"] if body.relative is None else body.relative)
        mid = mask_id(aid, run, tau, relative, body.format)
        files = self._files(aid, mid)
        with _create_lock:
            if files.request.exists():
                current = self.status(aid, mid)
                if current.status != "failed":
                    return current  # queued, running or done: the same mask is not computed twice
            self.limit.take(client)
            files.folder.mkdir(parents=True, exist_ok=True)
            files.error.unlink(missing_ok=True)
            task_id = f"mask-{mid}-{uuid.uuid4().hex[:8]}"
            write_json(
                files.request,
                {
                    "analysis": aid,
                    "run": run,
                    "checkpoint": ids[run],
                    "tau": tau,
                    "relative": relative,
                    "format": body.format,
                    "task_id": task_id,
                    "created_at": time.time(),
                },
            )
            self._send(aid, mid, json.loads(files.request.read_text()), base, target)
        return self.status(aid, mid)

    def _send(self, aid: str, mid: str, request: dict, base: dict, target: dict) -> None:
        self.celery.send_task(
            MASK_TASK,
            args=[
                aid,
                mid,
                base["path"],
                target["path"],
                request["tau"],
                request["relative"],
                request["format"] == "packed",
            ],
            kwargs={"pins": [base.get("pins"), target.get("pins")]},  # checked by the worker
            task_id=request["task_id"],
            queue=self.settings.queue,
        )

    def redeliver(self) -> list[str]:
        """Send every unfinished mask job again (see Jobs.redeliver); the task is idempotent."""
        sent = []
        for path in sorted((self.settings.data_dir / "masks").glob("*/*.json")):
            aid, mid = path.parent.name, path.stem
            try:
                if self.status(aid, mid).status not in ("queued", "running"):
                    continue
                job, request = self._job(aid), json.loads(path.read_text())
            except (ApiError, OSError, ValueError):  # deleted meanwhile, or not a mask request
                continue
            base, target = (self.catalog.checkpoint(job["checkpoints"][i]) for i in (0, request["run"]))
            if base is not None and target is not None:
                self._send(aid, mid, request, base, target)
                sent.append(mid)
        return sent

    def status(self, aid: str, mid: str) -> MaskOut:
        self._job(aid)
        files = self._files(aid, mid)
        try:
            request = json.loads(files.request.read_text())
        except (OSError, ValueError):
            raise not_found("mask", mid) from None
        state, progress, error, size = "queued", 0.0, None, None
        task_state, info = "PENDING", None
        if not files.file.exists() and not files.error.exists():
            # the task's state first, the files after: a task that ended wrote its file or reason before
            result = self.celery.AsyncResult(request["task_id"])
            task_state = result.state
            info = result.info if task_state in ("STARTED", "PROGRESS") else None
        if files.file.exists():
            state, progress, size = "done", 1.0, files.file.stat().st_size
        elif files.error.exists():
            state, error = "failed", ErrorOut(**json.loads(files.error.read_text()))
        elif task_state in ("STARTED", "PROGRESS"):
            state, progress = "running", float(info.get("progress", 0.0)) if isinstance(info, dict) else 0.0
        elif task_state != "PENDING":  # ended without a file or a reason: a crash, or the file was removed
            state = "failed"
            error = ErrorOut(
                code="worker_error", message="the mask export stopped without a result; create it again"
            )
        return MaskOut(
            id=mid,
            analysis=aid,
            status=state,
            progress=progress,
            error=error,
            run=request["run"],
            checkpoint=request["checkpoint"],
            tau=request["tau"],
            relative=request["relative"],
            format=request["format"],
            size=size,
            file=f"/api/analyses/{aid}/masks/{mid}/file" if state == "done" else None,
        )

    def file(self, aid: str, mid: str) -> tuple[Path, MaskOut]:
        status = self.status(aid, mid)
        if status.status == "failed":
            raise ApiError(409, "mask_failed", f"the mask export failed: {status.error.message}")
        if status.status != "done":
            raise ApiError(409, "not_ready", f"mask {mid} is {status.status}; poll it until it is done")
        return self._files(aid, mid).file, status
