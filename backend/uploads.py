"""Chunked, resumable uploads into a content-addressed store, and checkpoint registration.

An upload session declares its files (name, size). Chunks are PUT at a byte offset and streamed
to disk (constant memory, whatever the file size); the server keeps the contiguous prefix
received, hashing it as it grows. A chunk sent twice is acknowledged without writing; a chunk
that overlaps the end of the prefix (a resumed cut) contributes only its new bytes. On
completion every file is validated — safetensors headers before anything else reads them —
then moved to blobs/<sha256> (atomic rename) and hard-linked into a checkpoint folder.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import ClientDisconnect

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, not_found
from deltalens.backend.models import FILE_NAME
from deltalens.worker.errors import InputError
from deltalens.worker.settings import Settings

STEP_NAME = re.compile(r"^(step|checkpoint|ckpt|global_step|iter)[-_]?\d+$", re.IGNORECASE)
NAME = re.compile(FILE_NAME)
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class Uploads:
    """Upload sessions under uploads/<session>/. One request at a time writes a file (a second one
    gets 409 upload_busy), so a file never grows past its declared size; a session that receives
    nothing for DELTALENS_UPLOAD_SESSION_TTL seconds is removed with its files; one client may hold
    DELTALENS_MAX_UPLOAD_SESSIONS unfinished sessions."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings, self.catalog = settings, catalog
        self.root = settings.path("uploads")
        # sha256 of each file's received prefix: (bytes hashed, hasher); absent after an API restart,
        # then complete() hashes the file from disk (in the thread pool, never in the event loop)
        self._hashers: dict[tuple[str, str], tuple[int, hashlib._Hash]] = {}
        # (session, file) being written, (session, None): the session is being completed or removed
        self._busy: set[tuple[str, str | None]] = set()
        self._lock = threading.Lock()
        self.expire()  # sessions abandoned while the API was down

    # --- sessions ----------------------------------------------------------------------------
    def create(self, name: str, files: list[dict], client: str = "unknown") -> dict:
        if not files:
            raise ApiError(422, "invalid_request", "an upload needs at least one file")
        seen = set()
        for f in files:
            self._check_name(f["name"])
            if f["name"] in seen:
                raise ApiError(422, "invalid_request", f"file {f['name']!r} listed twice")
            seen.add(f["name"])
            if f["size"] < 0:
                raise ApiError(422, "invalid_request", f"file {f['name']!r}: negative size")
            limit, what = (
                (self.settings.max_metadata_bytes, "metadata (DELTALENS_MAX_METADATA_BYTES)")
                if f["name"].endswith(".json")
                else (self.settings.max_upload_bytes, "(DELTALENS_MAX_UPLOAD_BYTES)")
            )
            if f["size"] > limit:
                raise ApiError(
                    413,
                    "too_large",
                    f"file {f['name']!r} is {f['size']} bytes; the limit for {what} is {limit}",
                )
        if not any(f["name"].endswith(WEIGHT_SUFFIXES + PICKLE_SUFFIXES) for f in files):
            raise ApiError(422, "invalid_request", "an upload needs at least one weight file (.safetensors)")
        self.expire()
        needed, free = sum(f["size"] for f in files), shutil.disk_usage(self.root).free
        if needed > free:
            raise disk_full(f"this upload needs {needed} bytes but the data volume has {free} free")
        quota = self.settings.max_upload_sessions
        with self._lock:  # count and create together: parallel requests cannot both take the last place
            if quota and sum(1 for _, m in self._sessions() if m.get("client") == client) >= quota:
                raise ApiError(
                    429,
                    "too_many_uploads",
                    f"this client has {quota} unfinished uploads (DELTALENS_MAX_UPLOAD_SESSIONS); complete "
                    f"them, or wait until they expire ({self.settings.upload_session_ttl} s without data)",
                )
            sid = uuid.uuid4().hex[:16]
            folder = self.root / sid
            folder.mkdir(parents=True)
            for f in files:
                (folder / f"{f['name']}.part").touch()
            manifest = {"name": name, "files": files, "client": client, "created": time.time()}
            tmp = folder / "manifest.json.tmp"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, folder / "manifest.json")  # a session is there whole or not at all
        return self.status(sid)

    def _sessions(self):
        """(folder, manifest) of every session on disk."""
        for folder in self.root.iterdir():
            try:
                yield folder, json.loads((folder / "manifest.json").read_text())
            except (OSError, ValueError):
                continue  # being created or removed, or not a session

    def _last_activity(self, folder: Path) -> float:
        """When the session last received a byte (or was created)."""
        times = [folder.stat().st_mtime]
        for p in folder.iterdir():
            try:
                times.append(p.stat().st_mtime)
            except FileNotFoundError:
                pass
        return max(times)

    def expire(self) -> list[str]:
        """Remove sessions idle for longer than DELTALENS_UPLOAD_SESSION_TTL, files and all."""
        ttl, now, removed = self.settings.upload_session_ttl, time.time(), []
        if ttl <= 0:
            return removed
        for folder in list(self.root.iterdir()):
            try:
                if not folder.is_dir() or now - self._last_activity(folder) <= ttl:
                    continue
            except FileNotFoundError:
                continue
            if not self._claim(folder.name):  # a request is writing it right now: not abandoned
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
                with self._lock:
                    for key in [k for k in self._hashers if k[0] == folder.name]:
                        del self._hashers[key]
                removed.append(folder.name)
            finally:
                self._release(folder.name)
        return removed

    def _claim(self, sid: str, name: str | None = None) -> bool:
        """Mark a file (or, with name None, the whole session) as taken by this request."""
        with self._lock:
            if (sid, None) in self._busy or (sid, name) in self._busy:
                return False
            if name is None and any(k[0] == sid for k in self._busy):
                return False
            self._busy.add((sid, name))
            return True

    def _release(self, sid: str, name: str | None = None) -> None:
        with self._lock:
            self._busy.discard((sid, name))

    def _check_name(self, name: str) -> None:
        if not NAME.match(name) or ".." in name:
            raise ApiError(
                422, "invalid_name", f"file name {name!r} is not allowed (letters, digits, . _ - only)"
            )
        if name.endswith(PICKLE_SUFFIXES) and not self.settings.allow_pickle:
            raise ApiError(
                415,
                "pickle_refused",
                f"{name}: pickled checkpoints are not accepted here; convert to safetensors",
            )
        if not (name.endswith(WEIGHT_SUFFIXES + PICKLE_SUFFIXES) or name.endswith(".json")):
            raise ApiError(
                415, "unsupported_file", f"{name}: expected .safetensors weights or .json metadata"
            )

    def _manifest(self, sid: str) -> dict:
        folder = self.root / sid
        if not re.fullmatch(r"[0-9a-f]{16}", sid) or not (folder / "manifest.json").exists():
            raise not_found("upload", sid)
        try:
            ttl = self.settings.upload_session_ttl
            if ttl > 0 and time.time() - self._last_activity(folder) > ttl and self.expire().count(sid):
                raise not_found("upload", sid)  # abandoned: removed just now
            return json.loads((folder / "manifest.json").read_text())
        except FileNotFoundError:  # completed or removed meanwhile
            raise not_found("upload", sid) from None

    def status(self, sid: str) -> dict:
        manifest = self._manifest(sid)
        try:
            files = [
                {**f, "received": (self.root / sid / f"{f['name']}.part").stat().st_size}
                for f in manifest["files"]
            ]
        except FileNotFoundError:  # being completed right now
            raise ApiError(409, "upload_busy", f"upload {sid} is being completed") from None
        return {
            "id": sid,
            "name": manifest["name"],
            "files": files,
            "complete": all(f["received"] == f["size"] for f in files),
        }

    # --- chunks ------------------------------------------------------------------------------
    async def write(self, sid: str, name: str, offset: int, chunks: AsyncIterator[bytes]) -> dict:
        manifest = self._manifest(sid)
        entry = next((f for f in manifest["files"] if f["name"] == name), None)
        if entry is None:
            raise not_found("file in this upload", name)
        if not self._claim(sid, name):
            raise ApiError(
                409,
                "upload_busy",
                f"{name}: another request is writing this file (or completing the upload) right now; "
                f"retry when it has finished, from the byte count GET /api/uploads/{sid} gives",
            )
        try:
            part = self.root / sid / f"{name}.part"
            if not part.exists():  # completed or expired between the look-up and the claim
                raise not_found("upload", sid)
            return await self._write(sid, name, entry["size"], part, offset, chunks)
        finally:
            self._release(sid, name)

    async def _write(
        self, sid: str, name: str, size: int, part: Path, offset: int, chunks: AsyncIterator[bytes]
    ) -> dict:
        received = part.stat().st_size
        if offset > received:
            raise ApiError(
                409,
                "offset_gap",
                f"{name}: chunk starts at byte {offset} but only {received} bytes are in; "
                f"resume from {received}",
            )
        with self._lock:
            known = self._hashers.get((sid, name))
        # a copy: if this request fails, the file goes back to `received` bytes and the cached hasher
        # still matches it. Unknown (after a restart): complete() hashes from disk, not this request.
        h = known[1].copy() if known and known[0] == received else hashlib.sha256() if received == 0 else None
        skip = received - offset  # bytes of this chunk the server already has
        position, timeout = offset, self.settings.upload_read_timeout
        loop = asyncio.get_running_loop()
        with open(part, "ab", buffering=0) as out:  # unbuffered: a failed write leaves nothing pending
            try:
                async with asyncio.timeout(timeout) as deadline:
                    async for data in chunks:
                        deadline.reschedule(loop.time() + timeout)
                        if position + len(data) > size:
                            raise ApiError(
                                413, "too_large", f"{name}: data goes past the declared size of {size} bytes"
                            )
                        new = data[skip:] if skip > 0 else data
                        skip = max(0, skip - len(data))
                        position += len(data)
                        if new:
                            _write_all(out, new)
                            if h is not None:
                                h.update(new)
            except BaseException as e:  # also a disconnect or a cancelled request
                out.truncate(received)  # back to what this request found: nothing half-written stays
                if isinstance(e, TimeoutError):
                    raise ApiError(
                        408,
                        "upload_timeout",
                        f"{name}: no data for {timeout:g} s; the chunk was dropped, resume from byte "
                        f"{received}",
                    ) from None
                if isinstance(e, ClientDisconnect):
                    raise ApiError(
                        400, "disconnected", f"{name}: the client went away; resume from byte {received}"
                    ) from None
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full(
                        f"{name}: the data volume is full after {received} bytes; free space, then "
                        f"resume from byte {received}"
                    ) from None
                raise
        now = part.stat().st_size
        with self._lock:
            if h is not None:
                self._hashers[(sid, name)] = (now, h)
            else:
                self._hashers.pop((sid, name), None)
        return {"name": name, "received": now, "size": size}

    # --- completion --------------------------------------------------------------------------
    def complete(self, sid: str) -> str:
        self._manifest(sid)
        if not self._claim(sid):
            raise ApiError(
                409, "upload_busy", f"upload {sid}: a request is still sending data; complete it afterwards"
            )
        try:
            return self._complete(sid)
        finally:
            self._release(sid)

    def _complete(self, sid: str) -> str:
        status = self.status(sid)
        folder = self.root / sid
        for f in status["files"]:
            if f["received"] > f["size"]:  # only a session written before writes were serialised
                os.truncate(folder / f"{f['name']}.part", 0)
                with self._lock:
                    self._hashers.pop((sid, f["name"]), None)
                raise ApiError(
                    409,
                    "upload_incomplete",
                    f"{f['name']} held {f['received']} bytes, more than its declared {f['size']}; it was "
                    f"emptied: send it again from byte 0",
                )
        missing = [
            f"{f['name']} ({f['received']}/{f['size']} bytes)"
            for f in status["files"]
            if f["received"] != f["size"]
        ]
        if missing:
            raise ApiError(409, "upload_incomplete", "still missing data: " + ", ".join(missing))
        names = [f["name"] for f in status["files"]]
        staged = folder / "checkpoint"
        staged.mkdir(exist_ok=True)
        for name in names:
            os.replace(folder / f"{name}.part", staged / name)
        try:
            validate_folder(staged, self.settings)
        except ApiError:
            shutil.rmtree(folder)
            raise
        target = self.settings.path("checkpoints") / uuid.uuid4().hex[:12]
        try:
            cid = self._register(
                status["name"], {n: self._digest(sid, n, staged / n) for n in names}, staged, target
            )
        except OSError as e:  # nothing half-registered: the checkpoint folder goes, the session stays
            shutil.rmtree(target, ignore_errors=True)
            for name in names:
                os.replace(staged / name, folder / f"{name}.part")
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(
                    f"the data volume is full; free space, then complete upload {sid} again"
                ) from None
            raise
        shutil.rmtree(folder)
        return cid

    def _register(self, name: str, digests: dict[str, str], staged: Path, target: Path) -> str:
        """Content-addressed blobs (hard links from the session), a checkpoint folder of links to them,
        the catalog row."""
        target.mkdir()
        blobs = self.settings.path("blobs")
        for file, digest in digests.items():
            try:
                os.link(staged / file, blobs / digest)
            except FileExistsError:
                pass  # the same bytes were uploaded before
            os.link(blobs / digest, target / file)
        manifest_digest = hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()
        self.catalog.add_checkpoint(
            id=target.name,
            name=name,
            source="upload",
            path=str(target),
            files=[{"name": n, "sha256": d, "size": (target / n).stat().st_size} for n, d in digests.items()],
            bytes=sum((target / n).stat().st_size for n in digests),
            sha256=manifest_digest,
            pins=_pin(target),  # size + mtime of the linked files, checked by the worker before a run
        )
        return target.name

    def _digest(self, sid: str, name: str, path: Path) -> str:
        """sha256 of a received file: from the hasher the chunks fed, else read from disk (complete()
        runs in the thread pool, so this never holds up other requests)."""
        with self._lock:
            known = self._hashers.pop((sid, name), None)
        if known and known[0] == path.stat().st_size:
            return known[1].hexdigest()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


def _pin(folder: Path) -> dict:
    from deltalens.worker.checkpoint import confined, pin_checkpoint

    with confined([folder]):
        return pin_checkpoint(folder)


def _write_all(out, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]


def disk_full(message: str) -> ApiError:
    return ApiError(507, "disk_full", message)


def validate_folder(folder: Path, settings: Settings) -> None:
    """An upload's staged folder: everything the engine will read, checked before any worker touches
    it (4xx on failure; messages name the file, not the server path)."""
    try:
        for f in sorted(folder.iterdir()):  # every uploaded metadata file, read by the reader or not
            if f.suffix == ".json":
                try:
                    if not isinstance(json.loads(f.read_text()), dict):
                        raise ValueError("not an object")
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    raise InputError(f, f"not a JSON object ({e})") from None
        validate_checkpoint(folder, settings, [folder])
    except InputError as e:
        raise ApiError(422, "invalid_checkpoint", f"{Path(e.path).name}: {e.problem}") from None


def validate_checkpoint(path: Path, settings: Settings, roots: list[Path]) -> dict:
    """Open the checkpoint at `path` the way a worker will — every file it reads (config.json, index,
    weights, shards) must resolve inside `roots` — and return its pin: the size and mtime of those
    files, taken before they are validated, so that content changed afterwards fails the analysis.
    Pickled weights are refused unless DELTALENS_ALLOW_PICKLE, and then read in a child process
    (the API never imports torch). Raises InputError (Unconfined for a symlink out) or ApiError."""
    from deltalens.worker.checkpoint import (
        check_pickled,
        check_readable,
        checkpoint_files,
        confined,
        is_pickled,
        pin_checkpoint,
    )

    with confined(roots):
        pickled = [f for f in checkpoint_files(path) if is_pickled(f)]  # .bin/.pt/.pth, DCP files
        if pickled and not settings.allow_pickle:
            raise ApiError(
                415,
                "pickle_refused",
                f"{pickled[0].name}: pickled checkpoints are not accepted here (DELTALENS_ALLOW_PICKLE "
                "is off); convert to safetensors",
            )
        pins = pin_checkpoint(path)
        if pickled:
            check_pickled(path, roots)
        else:  # headers (the configured limit), index confinement, shards present, index names held
            check_readable(path, max_header=settings.max_header_bytes)
    return pins


def register_path(path: str, settings: Settings, catalog: Catalog) -> str:
    """Register a checkpoint already on a server volume under one of the allow-listed roots: the path
    and every file the reader will open must resolve inside them; what was validated is pinned."""
    from deltalens.worker.checkpoint import Unconfined

    resolved = Path(path).resolve()
    if not any(root == resolved or root in resolved.parents for root in settings.roots):
        raise ApiError(
            403, "path_not_allowed", f"{path} is not under an allowed root (DELTALENS_ALLOWED_ROOTS)"
        )
    if not resolved.exists():
        raise ApiError(404, "not_found", f"{path} does not exist")
    try:
        if (
            resolved.is_file()
            and resolved.suffix != ".safetensors"
            and resolved.suffix not in PICKLE_SUFFIXES
        ):
            raise InputError(resolved, "expected a .safetensors file or a checkpoint folder")
        pins = validate_checkpoint(resolved, settings, settings.roots)
    except Unconfined as e:
        raise ApiError(403, "path_not_allowed", str(e)) from None
    except InputError as e:
        raise ApiError(422, "invalid_checkpoint", str(e)) from None
    files = [resolved] if resolved.is_file() else sorted(p for p in resolved.iterdir() if p.is_file())
    cid = uuid.uuid4().hex[:12]
    # "run-a/checkpoint-500" says more than "checkpoint-500"
    name = f"{resolved.parent.name}/{resolved.name}" if STEP_NAME.match(resolved.name) else resolved.name
    catalog.add_checkpoint(
        id=cid,
        name=name,
        source="path",
        path=str(resolved),
        files=[{"name": p.name, "size": p.stat().st_size} for p in files],
        bytes=sum(p.stat().st_size for p in files),
        sha256=None,
        pins=pins,
    )
    return cid
