"""Checkpoints from the Hugging Face hub: `POST /api/checkpoints {"hub": "org/name@rev"}` starts a download
that a background thread runs, one at a time, into `<data>/checkpoints/hub` (the huggingface_hub cache,
inside the folder the workers may read); the snapshot folder is then validated and pinned like a
registered path, and the record names the new checkpoint.

Records live in memory (an API restart forgets them; the cache keeps what was downloaded, so asking
again registers it at once). The same repo@revision asked for while it is queued or downloading gets
the same record.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, found
from deltalens.backend.uploads import PICKLE_SUFFIXES, validate_checkpoint
from deltalens.worker import hub
from deltalens.worker.errors import InputError
from deltalens.worker.settings import Settings

ACTIVE = ("queued", "downloading")
MAX_QUEUED = 8  # downloads waiting behind the running one; more are refused (429)
KEEP = 256  # finished records kept for GET


class Downloads:
    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings, self.catalog = settings, catalog
        self.cache = settings.path("checkpoints", "hub")
        self._records: OrderedDict[str, dict] = OrderedDict()
        self._queue: queue.Queue[str] = queue.Queue(MAX_QUEUED)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, text: str) -> dict:
        """A queued download of `text` (org/name[@revision], hf:// allowed), or the active one for it."""
        try:
            spec = hub.parse_spec(text)
        except InputError as e:
            raise ApiError(422, "invalid_request", f"hub: {e}") from None
        with self._lock:
            key = (spec.repo, spec.revision)
            for record in self._records.values():
                if record["state"] in ACTIVE and (record["hub"], record["revision"]) == key:
                    return dict(record)
            did = uuid.uuid4().hex[:12]
            record = {
                "id": did,
                "hub": spec.repo,
                "revision": spec.revision,
                "state": "queued",
                "done_bytes": 0,
                "total_bytes": 0,
                "files_done": 0,
                "files_total": 0,
                "checkpoint": None,
                "error": None,
            }
            try:
                self._queue.put_nowait(did)
            except queue.Full:
                raise ApiError(
                    429, "too_many_downloads", f"{MAX_QUEUED} hub downloads are waiting; retry later"
                ) from None
            self._records[did] = record
            self._forget()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hub-downloads", daemon=True)
                self._thread.start()
            return dict(record)

    def get(self, did: str) -> dict:
        with self._lock:
            return dict(found(self._records.get(did), "download", did))

    def _forget(self) -> None:
        """Drop the oldest finished records beyond KEEP."""
        done = [k for k, r in self._records.items() if r["state"] not in ACTIVE]
        for key in done[: max(0, len(self._records) - KEEP)]:
            del self._records[key]

    def _update(self, did: str, **fields) -> None:
        with self._lock:
            self._records[did].update(fields)

    def _run(self) -> None:
        while True:
            did = self._queue.get()
            try:
                self._update(did, state="downloading")
                self._update(did, state="done", checkpoint=self._download(did))
            except (ApiError, hub.HubError) as e:
                self._update(did, state="failed", error=_error(e))
            except Exception as e:  # a bug or a surprise from the library: still a failed record
                error = {"code": "download_error", "message": f"the download stopped ({type(e).__name__})"}
                self._update(did, state="failed", error=error)

    def _download(self, did: str) -> str:
        record = self.get(did)
        spec = hub.HubSpec(record["hub"], record["revision"])

        def progress(p: hub.Progress) -> None:
            self._update(
                did,
                done_bytes=p.done_bytes,
                total_bytes=p.total_bytes,
                files_done=p.files_done,
                files_total=p.files_total,
            )

        folder = hub.resolve(spec, cache_dir=self.cache, progress=progress, refuse=self._refuse)
        return self._register(spec, folder)

    def _refuse(self, spec: hub.HubSpec, files: list[str]) -> None:
        """Before any byte is fetched: pickled weights are refused unless DELTALENS_ALLOW_PICKLE."""
        pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickled and not self.settings.allow_pickle:
            raise ApiError(
                415,
                "pickle_refused",
                f"{spec}: {pickled[0]} is pickled; pickled checkpoints are not accepted here "
                "(DELTALENS_ALLOW_PICKLE is off)",
            )

    def _register(self, spec: hub.HubSpec, folder: Path) -> str:
        """The snapshot folder as a checkpoint: validated and pinned as `register_path` does, confined
        to the hub cache (its files are links into the cache's blobs/)."""
        try:
            pins = validate_checkpoint(folder, self.settings, [self.cache])
        except InputError as e:
            raise ApiError(422, "invalid_checkpoint", f"{spec}: {e.problem}") from None
        files = sorted(p for p in folder.iterdir() if p.is_file())
        cid = uuid.uuid4().hex[:12]
        self.catalog.add_checkpoint(
            id=cid,
            name=f"{spec.repo}@{spec.revision}",
            source="hub",
            path=str(folder),
            files=[{"name": p.name, "size": p.stat().st_size} for p in files],
            bytes=sum(p.stat().st_size for p in files),
            sha256=None,
            pins=pins,
        )
        return cid


def _error(e: ApiError | hub.HubError) -> dict:
    return {"code": e.code, "message": e.message if isinstance(e, ApiError) else str(e)}
