"""Analysis jobs: queue them on Celery, follow them, ingest what the workers publish.

The API never runs an analysis and never waits for one: `submit` sends the task (by name, so no
engine code is imported here) and a background thread (`follow`) polls the result backend for
progress and final states, ingesting published artifacts into the catalog.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from pathlib import Path

from celery import Celery, chord

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, not_found
from deltalens.worker.celery_app import ANALYSIS_TASK, MERGE_TASK, PART_TASK
from deltalens.worker.contract import TAU_RULE, TERMINAL, valid_tau
from deltalens.worker.settings import Settings

log = logging.getLogger("deltalens.jobs")
MIN_CHECKPOINTS = {"pair": (2, 2), "series": (2, 64), "overlap": (3, 13)}  # base included


class Jobs:
    def __init__(self, settings: Settings, catalog: Catalog, celery: Celery):
        self.settings, self.catalog, self.celery = settings, catalog, celery
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(
        self, kind: str, checkpoint_ids: list[str], taus: list[float], relative: bool, rank: bool
    ) -> str:
        low, high = MIN_CHECKPOINTS[kind]
        if not low <= len(checkpoint_ids) <= high:
            raise ApiError(
                422,
                "invalid_request",
                f"a {kind} analysis takes {low}"
                + (f" to {high}" if high != low else "")
                + f" checkpoints (base first); got {len(checkpoint_ids)}",
            )
        if not taus or not all(valid_tau(t) for t in taus):
            raise ApiError(422, "invalid_request", f"taus: each {TAU_RULE}")
        paths = []
        for cid in checkpoint_ids:
            checkpoint = self.catalog.checkpoint(cid)
            if checkpoint is None:
                raise not_found("checkpoint", cid)
            paths.append(checkpoint["path"])
        jid = uuid.uuid4().hex[:12]
        self.catalog.add_job(jid, kind, checkpoint_ids, taus, relative, rank)
        groups = shard_groups(Path(paths[0]), self.settings.fanout) if kind == "pair" else []
        if (
            len(groups) > 1
        ):  # fan out: one task per shard group, merged by the chord's callback (task id = jid)
            self.catalog.update_job(jid, detail={"parts": len(groups)})
            task = lambda name, args, tid: self.celery.signature(
                name, args=args, queue=self.settings.queue
            ).set(task_id=tid)  # noqa: E731
            chord(
                [
                    task(PART_TASK, [jid, k, paths, names, taus, relative, rank], f"{jid}-p{k}")
                    for k, names in enumerate(groups)
                ],
                task(MERGE_TASK, [jid, paths, taus, relative, rank], jid),
            ).apply_async()
        else:
            self.celery.send_task(
                ANALYSIS_TASK,
                args=[jid, kind, paths, taus, relative, rank],
                task_id=jid,
                queue=self.settings.queue,
            )
        return jid

    def cancel(self, jid: str) -> None:
        job = self.catalog.job(jid)
        if job is None:
            raise not_found("analysis", jid)
        if job["status"] in TERMINAL:
            raise ApiError(409, "already_finished", f"analysis {jid} is already {job['status']}")
        (self.settings.path("cancel") / jid).touch()  # the worker checks this between tensors
        self.catalog.update_job(jid, status="cancelled")

    def delete(self, jid: str) -> None:
        job = self.catalog.job(jid)
        if job is None:
            raise not_found("analysis", jid)
        if job["status"] not in TERMINAL:
            (self.settings.path("cancel") / jid).touch()
        self.catalog.delete_job(jid)
        (self.settings.path("results") / f"{jid}.duckdb").unlink(missing_ok=True)
        shutil.rmtree(
            self.settings.path("results") / f"{jid}.parts", ignore_errors=True
        )  # a fanned-out run's parts

    # --- following the workers ---------------------------------------------------------------
    def sync(self) -> None:
        """One pass over unfinished jobs: progress, results, failures."""
        for job in self.catalog.jobs(active_only=True):
            try:
                self._sync_job(job)
            except Exception:  # a broken backend connection must not stop the loop
                log.exception("could not follow analysis %s", job["id"])

    def _sync_job(self, job: dict) -> None:
        result = self.celery.AsyncResult(job["id"])
        state = result.state
        parts = (json.loads(job["detail"]) if job["detail"] else {}).get("parts")
        if state == "PENDING" and parts:  # a fanned-out analysis: its parts' progress until the merge runs
            self._sync_parts(job["id"], parts)
        elif state in ("STARTED", "PROGRESS"):
            info = result.info if isinstance(result.info, dict) else {}
            self.catalog.update_job(
                job["id"], status="running", progress=float(info.get("progress", 0.0)), detail=info
            )
        elif state == "SUCCESS":
            outcome = result.result or {}
            if outcome.get("status") == "done":
                if outcome.get("parts"):
                    self.catalog.update_job(
                        job["id"], detail={"parts": len(outcome["parts"]), "workers": outcome["parts"]}
                    )
                self.catalog.ingest(job["id"], Path(outcome["artifact"]))
            elif outcome.get("status") == "cancelled":
                self.catalog.update_job(job["id"], status="cancelled")
            else:
                error = outcome.get("error") or {"code": "failed", "message": "the analysis failed"}
                self.catalog.update_job(
                    job["id"], status="failed", error_code=error["code"], error_message=error["message"]
                )
        elif state == "FAILURE":
            self.catalog.update_job(
                job["id"],
                status="failed",
                error_code="worker_error",
                error_message=f"{type(result.result).__name__}: {result.result}"[:2000],
            )

    def _sync_parts(self, jid: str, parts: int) -> None:
        states = [self.celery.AsyncResult(f"{jid}-p{k}") for k in range(parts)]
        progress = [
            1.0
            if r.state == "SUCCESS"
            else float((r.info or {}).get("progress", 0.0))
            if r.state == "PROGRESS" and isinstance(r.info, dict)
            else 0.0
            for r in states
        ]
        if any(r.state != "PENDING" for r in states):
            self.catalog.update_job(
                jid,
                status="running",
                progress=sum(progress) / parts,
                detail={"parts": parts, "parts_done": sum(r.state == "SUCCESS" for r in states)},
            )

    def follow(self, interval: float = 0.5) -> None:
        def loop():
            while not self._stop.wait(interval):
                self.sync()

        self._thread = threading.Thread(target=loop, name="deltalens-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


def shard_groups(path: Path, parts: int) -> list[list[str]]:
    """Tensor names of a sharded checkpoint in up to `parts` groups of whole shards, balanced by
    bytes (read from the index and the file sizes; no tensor is touched). [] when not sharded."""
    index = path / "model.safetensors.index.json"
    if parts < 2 or not index.is_file():
        return []
    by_shard: dict[str, list[str]] = {}
    for name, shard in json.loads(index.read_text())["weight_map"].items():
        by_shard.setdefault(shard, []).append(name)
    shards = sorted(by_shard)
    sizes = [(path / s).stat().st_size for s in shards]
    groups: list[list[str]] = [[]]
    share, filled = sum(sizes) / min(parts, len(shards)), 0.0
    for shard, size in zip(shards, sizes):
        if groups[-1] and filled + size / 2 > share * len(groups) and len(groups) < parts:
            groups.append([])
        groups[-1] += by_shard[shard]
        filled += size
    return groups
