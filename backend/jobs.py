"""Analysis jobs: queue them on Celery, follow them, ingest what the workers publish.

The API never runs an analysis and never waits for one: `submit` sends the task (by name, so no
engine code is imported here) and a background thread (`follow`) polls the result backend for
progress and final states, ingesting published artifacts into the catalog.

Cancel, delete and the follow thread's final transitions take one lock and re-read the job, so a
cancel that races a finishing worker ends in one consistent state: an artifact already published is
ingested (the analysis is done; cancel answers 409), otherwise the job is cancelled and whatever its
task still publishes is removed. What a finished or deleted analysis leaves in the data folder
(cancel marker, attempt counters, parts, task states, an artifact never to be ingested) is removed
when it finishes, when it is deleted, and by a periodic sweep (`DELTALENS_SWEEP_INTERVAL`) once its
task can no longer run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from celery import Celery, chord
from celery.backends.filesystem import FilesystemBackend
from celery.states import READY_STATES

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, not_found
from deltalens.worker.celery_app import ANALYSIS_TASK, MERGE_TASK, PART_TASK
from deltalens.worker.contract import MAX_OVERLAP_RUNS, TAU_RULE, TERMINAL, valid_tau
from deltalens.worker.settings import Settings

log = logging.getLogger("deltalens.jobs")
MIN_CHECKPOINTS = {"pair": (2, 2), "series": (2, 64), "overlap": (3, MAX_OVERLAP_RUNS + 1)}  # base included
JOB_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12], see submit
TASK_META = "celery-task-meta-"  # the file result backend's file name for a task id
TASK_FILE = re.compile(TASK_META + r"([0-9a-f]{12})(-p\d+)?")  # an analysis task or one of its parts
STALE_S = 7 * 24 * 3600  # leftovers of a task that never reported back are removed after this long


class Jobs:
    def __init__(self, settings: Settings, catalog: Catalog, celery: Celery):
        self.settings, self.catalog, self.celery = settings, catalog, celery
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # cancel / delete / final transitions of one job: one at a time
        self._next_sweep = 0.0

    def submit(
        self,
        kind: str,
        checkpoint_ids: list[str],
        taus: list[float],
        relative: bool,
        rank: bool,
        geometry: bool = True,
        title: str | None = None,
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
        paths, pins = self._inputs(checkpoint_ids)
        jid = uuid.uuid4().hex[:12]
        self.catalog.add_job(jid, kind, checkpoint_ids, taus, relative, rank, title)
        # fan out (any kind): one task per shard group of the base — part 0 also takes the tensors the
        # base does not store — merged by the chord's callback (task id = jid)
        groups = shard_groups(Path(paths[0]), self.settings.fanout)
        if len(groups) > 1:
            self.catalog.update_job(jid, detail={"parts": len(groups)})
            kwargs = {"pins": pins, "geometry": geometry, "kind": kind}
            task = lambda name, args, tid: self.celery.signature(
                name, args=args, kwargs=kwargs, queue=self.settings.queue
            ).set(task_id=tid)  # noqa: E731
            chord(
                [
                    task(PART_TASK, [jid, k, paths, names, taus, relative, rank], f"{jid}-p{k}")
                    for k, names in enumerate(groups)
                ],
                task(MERGE_TASK, [jid, paths, taus, relative, rank], jid),
            ).apply_async()
        else:
            self._send(jid, kind, paths, pins, taus, relative, rank, geometry)
        return jid

    def _inputs(self, checkpoint_ids: list[str]) -> tuple[list[str], list[dict | None]]:
        """Paths, and pins: what each checkpoint held when registered (the worker checks them)."""
        paths, pins = [], []
        for cid in checkpoint_ids:
            checkpoint = self.catalog.checkpoint(cid)
            if checkpoint is None:
                raise not_found("checkpoint", cid)
            paths.append(checkpoint["path"])
            pins.append(checkpoint.get("pins"))
        return paths, pins

    def _send(self, jid, kind, paths, pins, taus, relative, rank, geometry=True) -> None:
        self.celery.send_task(
            ANALYSIS_TASK,
            args=[jid, kind, paths, taus, relative, rank],
            kwargs={"pins": pins, "geometry": geometry},
            task_id=jid,
            queue=self.settings.queue,
        )

    def redeliver(self) -> list[str]:
        """Send the task of every unfinished, unfanned analysis again. For brokers that forget a message
        once a worker took it (the filesystem broker of `deltalens up`), after that worker was lost.
        Safe for tasks still queued or running: they are idempotent (a published artifact ends them at
        once) and count their attempts, so a task that keeps killing its worker ends `failed`."""
        sent = []
        for job in self.catalog.jobs(active_only=True):
            detail = json.loads(job["detail"]) if job["detail"] else {}
            if detail.get("parts") or self.celery.AsyncResult(job["id"]).state in ("SUCCESS", "FAILURE"):
                continue
            try:
                paths, pins = self._inputs(job["checkpoints"])
            except ApiError:  # a checkpoint was deleted meanwhile: the follow loop reports the job
                continue
            self._send(job["id"], job["kind"], paths, pins, job["taus"], job["relative"], job["rank"])
            sent.append(job["id"])
        return sent

    def cancel(self, jid: str) -> None:
        with self._lock:
            job = self.catalog.job(jid)
            if job is None:
                raise not_found("analysis", jid)
            if job["status"] in TERMINAL:
                raise ApiError(409, "already_finished", f"analysis {jid} is already {job['status']}")
            artifact = self.settings.path("results") / f"{jid}.duckdb"
            if artifact.is_file():  # published, not yet ingested: the analysis has finished
                try:
                    self._record_attempts(jid)
                    self.catalog.ingest(jid, artifact)
                except Exception:  # an unreadable artifact: cancel it like a running job
                    log.exception("could not ingest analysis %s on cancel", jid)
                else:
                    self._clean(jid, job, artifact=False)
                    raise ApiError(409, "already_finished", f"analysis {jid} is already done")
            (self.settings.path("cancel") / jid).touch()  # the worker checks this between tensors
            self.catalog.update_job(jid, status="cancelled")

    def delete(self, jid: str) -> None:
        with self._lock:
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
            shutil.rmtree(self.settings.data_dir / "masks" / jid, ignore_errors=True)  # its exported masks
            if job["status"] in ("done", "failed") or self._ready(jid):  # its task will not run again
                self._clean(jid, job, artifact=True)

    # --- what finished or deleted analyses leave behind ---------------------------------------
    def _record_attempts(self, jid: str) -> None:
        """Keep in the job's detail how many times its task started (the counters are removed once it
        is done): `attempts` > 1 means it survived a lost worker."""
        counts = []
        for counter in self.settings.path("attempts").glob(f"{jid}*"):
            if counter.name == jid or counter.name.removeprefix(f"{jid}.").isdigit():
                try:
                    counts.append(int(counter.read_text() or 0))
                except (OSError, ValueError):
                    pass
        if counts:
            job = self.catalog.job(jid) or {}
            detail = json.loads(job["detail"]) if job.get("detail") else {}
            self.catalog.update_job(jid, detail={**detail, "attempts": max(counts)})

    def _ready(self, jid: str) -> bool:
        """Has the analysis' task (or the merge of its parts) returned, so that nothing runs for it?"""
        try:
            return self.celery.AsyncResult(jid).state in READY_STATES
        except Exception:  # the result backend is unreachable: assume it may still run
            log.warning("could not read the state of analysis %s", jid, exc_info=True)
            return False

    def _result_folder(self) -> Path | None:
        backend = self.celery.backend
        return Path(backend.path.decode()) if isinstance(backend, FilesystemBackend) else None

    def _clean(self, jid: str, job: dict | None, artifact: bool) -> None:
        """Remove an analysis' cancel marker, attempt counters, parts, temporary artifacts and task
        states (and its artifact when `artifact`: one that will never be ingested). Only for an
        analysis whose task can no longer run: a queued task whose marker is gone would run."""
        if not JOB_ID.fullmatch(jid):
            return
        results = self.settings.path("results")
        (self.settings.path("cancel") / jid).unlink(missing_ok=True)
        for counter in self.settings.path("attempts").glob(f"{jid}*"):  # <id>, <id>.<part>, <id>.tmp
            counter.unlink(missing_ok=True)
        shutil.rmtree(results / f"{jid}.parts", ignore_errors=True)
        for tmp in results.glob(f".{jid}.duckdb.tmp-*"):  # a killed writer's (+ .wal)
            tmp.unlink(missing_ok=True)
        if artifact:
            (results / f"{jid}.duckdb").unlink(missing_ok=True)
        detail = json.loads(job["detail"]) if job and job.get("detail") else {}
        tasks = {jid, *(f"{jid}-p{k}" for k in range(int(detail.get("parts") or 0)))}
        folder = self._result_folder()
        if folder is not None:
            tasks |= {p.name.removeprefix(TASK_META) for p in folder.glob(f"{TASK_META}{jid}-p*")}
        for task_id in tasks:
            try:
                self.celery.AsyncResult(task_id).forget()
            except FileNotFoundError:
                pass
            except Exception:
                log.warning("could not forget the task state of %s", task_id, exc_info=True)

    def sweep(self) -> None:
        """Clean up after every analysis that is finished or deleted and whose task can no longer run
        (it has returned, or left nothing for STALE_S): markers, counters, parts, task states, and
        artifacts published after a cancel or a delete."""
        known = {job["id"]: job for job in self.catalog.jobs()}
        newest: dict[str, float] = {}  # analysis id -> newest mtime of what it left behind

        def note(jid: str, path: Path) -> None:
            job = known.get(jid)
            if JOB_ID.fullmatch(jid) and (job is None or job["status"] in TERMINAL):
                try:
                    newest[jid] = max(newest.get(jid, 0.0), path.lstat().st_mtime)
                except FileNotFoundError:
                    pass

        for path in self.settings.path("cancel").iterdir():
            note(path.name, path)
        for path in self.settings.path("attempts").iterdir():
            note(path.name.split(".", 1)[0], path)
        for path in self.settings.path("results").iterdir():
            name = path.name
            if name.endswith(".parts"):
                note(name.removesuffix(".parts"), path)
            elif name.startswith(".") and ".duckdb.tmp-" in name:
                note(name[1:].split(".", 1)[0], path)
            elif name.endswith(".duckdb"):
                jid = name.removesuffix(".duckdb")
                if (known.get(jid) or {}).get("status") != "done":  # a done job's artifact stays
                    note(jid, path)
        folder = self._result_folder()
        if folder is not None and folder.is_dir():
            for path in folder.iterdir():
                if match := TASK_FILE.fullmatch(path.name):
                    note(match.group(1), path)
        stale = time.time() - max(STALE_S, 2 * self.settings.task_time_limit)
        for jid, mtime in newest.items():
            with self._lock:
                job = self.catalog.job(jid)
                if job is not None and job["status"] not in TERMINAL:
                    continue  # resubmitted or still running since the listing: not ours to touch
                if job is not None and job["status"] == "done":
                    self._clean(jid, job, artifact=False)
                elif self._ready(jid) or mtime < stale:
                    self._clean(jid, job, artifact=True)

    # --- following the workers ---------------------------------------------------------------
    def sync(self) -> None:
        """One pass over unfinished jobs: progress, results, failures."""
        for job in self.catalog.jobs(active_only=True):
            try:
                with self._lock:  # a cancel or delete may have come in since the listing
                    current = self.catalog.job(job["id"])
                    if current is not None and current["status"] not in TERMINAL:
                        self._sync_job(current)
            except Exception:  # a broken backend connection must not stop the loop
                log.exception("could not follow analysis %s", job["id"])
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.settings.sweep_interval
            try:
                self.sweep()
            except Exception:
                log.exception("could not sweep the data folder")

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
                self._record_attempts(job["id"])  # before the ingest makes it visible as done
                self.catalog.ingest(job["id"], Path(outcome["artifact"]))
                self._clean(job["id"], job, artifact=False)
            elif outcome.get("status") == "cancelled":
                self.catalog.update_job(job["id"], status="cancelled")
                self._clean(job["id"], job, artifact=True)
            else:
                error = outcome.get("error") or {"code": "failed", "message": "the analysis failed"}
                self.catalog.update_job(
                    job["id"], status="failed", error_code=error["code"], error_message=error["message"]
                )
                self._clean(job["id"], job, artifact=True)
        elif state == "FAILURE":
            self.catalog.update_job(
                job["id"],
                status="failed",
                error_code="worker_error",
                error_message=f"the worker stopped on an unexpected error ({type(result.result).__name__}); "
                "the worker's log has the details",
            )
            self._clean(job["id"], job, artifact=True)

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
