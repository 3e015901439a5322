"""Chunked, resumable uploads into a content-addressed store, and checkpoint registration.

An upload session declares its files (name, size). Chunks are PUT at a byte offset and streamed
to disk (constant memory, whatever the file size); the server keeps the contiguous prefix
received, hashing it as it grows. A chunk sent twice is acknowledged without writing; a chunk
that overlaps the end of the prefix (a resumed cut) contributes only its new bytes. On
completion every file is validated — safetensors headers before anything else reads them —
then moved to blobs/<sha256> (atomic rename) and hard-linked into a checkpoint folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, not_found
from deltalens.backend.models import FILE_NAME
from deltalens.worker.errors import InputError
from deltalens.worker.safetensors_header import read_header
from deltalens.worker.settings import Settings

STEP_NAME = re.compile(r"^(step|checkpoint|ckpt|global_step|iter)[-_]?\d+$", re.IGNORECASE)
NAME = re.compile(FILE_NAME)
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class Uploads:
    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings, self.catalog = settings, catalog
        self.root = settings.path("uploads")
        self._hashers: dict[tuple[str, str], tuple[int, hashlib._Hash]] = {}
        self._lock = threading.Lock()

    # --- sessions ----------------------------------------------------------------------------
    def create(self, name: str, files: list[dict]) -> dict:
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
            if f["size"] > self.settings.max_upload_bytes:
                raise ApiError(
                    413,
                    "too_large",
                    f"file {f['name']!r} is {f['size']} bytes; the limit is {self.settings.max_upload_bytes}",
                )
        if not any(f["name"].endswith(WEIGHT_SUFFIXES + PICKLE_SUFFIXES) for f in files):
            raise ApiError(422, "invalid_request", "an upload needs at least one weight file (.safetensors)")
        needed, free = sum(f["size"] for f in files), shutil.disk_usage(self.root).free
        if needed > free:
            raise disk_full(f"this upload needs {needed} bytes but the data volume has {free} free")
        sid = uuid.uuid4().hex[:16]
        folder = self.root / sid
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"name": name, "files": files}))
        for f in files:
            (folder / f"{f['name']}.part").touch()
        return self.status(sid)

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
        if not re.fullmatch(r"[0-9a-f]{16}", sid) or not (self.root / sid / "manifest.json").exists():
            raise not_found("upload", sid)
        return json.loads((self.root / sid / "manifest.json").read_text())

    def status(self, sid: str) -> dict:
        manifest = self._manifest(sid)
        files = [
            {**f, "received": (self.root / sid / f"{f['name']}.part").stat().st_size}
            for f in manifest["files"]
        ]
        return {
            "id": sid,
            "name": manifest["name"],
            "files": files,
            "complete": all(f["received"] == f["size"] for f in files),
        }

    # --- chunks ------------------------------------------------------------------------------
    def _hasher(self, sid: str, name: str, part: Path) -> hashlib._Hash:
        """sha256 of the received prefix; rebuilt from disk after an API restart."""
        key = (sid, name)
        size = part.stat().st_size
        with self._lock:
            known = self._hashers.get(key)
            if known and known[0] == size:
                return known[1]
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h

    async def write(self, sid: str, name: str, offset: int, chunks: AsyncIterator[bytes]) -> dict:
        manifest = self._manifest(sid)
        entry = next((f for f in manifest["files"] if f["name"] == name), None)
        if entry is None:
            raise not_found("file in this upload", name)
        part = self.root / sid / f"{name}.part"
        received = part.stat().st_size
        if offset > received:
            raise ApiError(
                409,
                "offset_gap",
                f"{name}: chunk starts at byte {offset} but only {received} bytes are in; "
                f"resume from {received}",
            )
        h = self._hasher(sid, name, part)
        skip = received - offset  # bytes of this chunk the server already has
        position = offset
        with open(part, "ab", buffering=0) as out:  # unbuffered: a failed write leaves nothing pending
            try:
                async for data in chunks:
                    if position + len(data) > entry["size"]:
                        raise ApiError(
                            413,
                            "too_large",
                            f"{name}: data goes past the declared size of {entry['size']} bytes",
                        )
                    new = data[skip:] if skip > 0 else data
                    skip = max(0, skip - len(data))
                    position += len(data)
                    if new:
                        _write_all(out, new)
                        h.update(new)
            except (ApiError, OSError) as e:
                out.truncate(received)  # back to what this request found: nothing half-written stays
                with self._lock:
                    self._hashers.pop((sid, name), None)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full(
                        f"{name}: the data volume is full after {received} bytes; free space, then "
                        f"resume from byte {received}"
                    ) from None
                raise
        size = part.stat().st_size
        with self._lock:
            self._hashers[(sid, name)] = (size, h)
        return {"name": name, "received": size, "size": entry["size"]}

    # --- completion --------------------------------------------------------------------------
    def complete(self, sid: str) -> str:
        status = self.status(sid)
        missing = [
            f"{f['name']} ({f['received']}/{f['size']} bytes)"
            for f in status["files"]
            if f["received"] != f["size"]
        ]
        if missing:
            raise ApiError(409, "upload_incomplete", "still missing data: " + ", ".join(missing))
        folder, names = self.root / sid, [f["name"] for f in status["files"]]
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
        except (
            OSError
        ) as e:  # nothing half-registered: the checkpoint folder goes, the session stays as it was
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
        )
        return target.name

    def _digest(self, sid: str, name: str, path: Path) -> str:
        with self._lock:
            known = self._hashers.pop((sid, name), None)
        if known and known[0] == path.stat().st_size:
            return known[1].hexdigest()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


def _write_all(out, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]


def disk_full(message: str) -> ApiError:
    return ApiError(507, "disk_full", message)


def validate_folder(folder: Path, settings: Settings) -> None:
    """Everything the engine will read, checked before any worker touches it (4xx on failure)."""
    from deltalens.worker.checkpoint import open_checkpoint

    try:
        for f in sorted(folder.iterdir()):
            if f.suffix == ".safetensors":
                read_header(f, max_header=settings.max_header_bytes)
            elif f.suffix == ".json":
                try:
                    if not isinstance(json.loads(f.read_text()), dict):
                        raise ValueError("not an object")
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    raise InputError(f, f"not a JSON object ({e})") from None
        if not any(f.suffix in PICKLE_SUFFIXES for f in folder.iterdir()):
            open_checkpoint(folder)  # index confinement, shards present, index names held by shards
    except InputError as e:
        raise ApiError(422, "invalid_checkpoint", f"{Path(e.path).name}: {e.problem}") from None


def register_path(path: str, settings: Settings, catalog: Catalog) -> str:
    """Register a checkpoint already on a server volume under one of the allow-listed roots."""
    resolved = Path(path).resolve()
    if not any(root == resolved or root in resolved.parents for root in settings.roots):
        raise ApiError(
            403, "path_not_allowed", f"{path} is not under an allowed root (DELTALENS_ALLOWED_ROOTS)"
        )
    if not resolved.exists():
        raise ApiError(404, "not_found", f"{path} does not exist")
    folder = resolved if resolved.is_dir() else resolved.parent
    try:
        if resolved.is_file():
            if resolved.suffix == ".safetensors":
                read_header(resolved, max_header=settings.max_header_bytes)
            elif resolved.suffix not in PICKLE_SUFFIXES or not settings.allow_pickle:
                raise InputError(resolved, "expected a .safetensors file or a checkpoint folder")
        else:
            validate_folder(folder, settings)
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
    )
    return cid
