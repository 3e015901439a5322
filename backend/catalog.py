"""The catalog: one DuckDB file, opened read-write by the API process only (invariant 1).

It holds registered checkpoints, analysis jobs, short links and — once a worker has published an
analysis artifact — that analysis's result rows, copied in one transaction (never half of them).

Writes go through the one connection under `lock`. Result reads (`read`, `read_rows`) use a pool
of cursors instead — each its own DuckDB connection to the same database — so dashboard reads run
side by side, and do not wait for an ingest: they see the last committed state (MVCC). What is
derived from the results of a finished analysis is immutable until that analysis is ingested again
or deleted, so it may be kept in `cache`, which both of those invalidate (after their commit).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import OrderedDict
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from deltalens.worker.contract import (
    BIN_EDGES,
    DEFAULT_TAU,
    MAX_TITLE,
    SCHEMA_SQL,
    TABLES,
    TERMINAL,
    nearest_edge_index,
)

CATALOG_SQL = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, source VARCHAR NOT NULL,   -- upload | path
    path VARCHAR NOT NULL, files JSON NOT NULL, bytes BIGINT NOT NULL, sha256 VARCHAR,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, status VARCHAR NOT NULL,
    checkpoints VARCHAR[] NOT NULL, taus DOUBLE[] NOT NULL, relative BOOLEAN NOT NULL, rank BOOLEAN NOT NULL,
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL,
    progress DOUBLE NOT NULL DEFAULT 0, detail JSON, error_code VARCHAR, error_message VARCHAR
);
CREATE TABLE IF NOT EXISTS links (
    code VARCHAR PRIMARY KEY, url VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL
);
"""
CHECKPOINT_FIELDS = ("id", "name", "source", "path", "files", "bytes", "sha256", "created_at", "pins")
# pins: {"files": {name: {"size", "mtime_ns"}}} of every file the reader opens, recorded when the
# checkpoint was validated; workers refuse to run on files that no longer match. NULL in catalogs
# written before pins existed (column added on open): such checkpoints are not checked.
# Result tables with one or a few rows per matrix. In the catalog they carry one more column,
# tensor_key = '<analysis id>/<name>', with an ART index: a one-matrix lookup on that single key
# is ~1 ms, where filtering analysis_id and name scans every stored update map (~10 ms).
KEYED = ("tensors", "changed", "histograms", "spectra", "update_maps")
QUERY_ARTIFACT_TABLES = "SELECT table_name FROM duckdb_tables() WHERE database_name = 'artifact'"
# an analysis' title when none is given (and for jobs stored before titles existed), from its
# checkpoints' names in CLI order: base first
DEFAULT_TITLES = {
    "pair": lambda base, rest: f"{rest[-1]} vs {base}",
    "series": lambda base, rest: f"{base} → {rest[-1]} ({len(rest)} checkpoints)",
    "overlap": lambda base, rest: f"{', '.join(rest)} from {base}",
}
# the list's headline figure of a finished analysis, by kind: (metric, query of (value, baseline));
# $start: the first histogram column above the default τ's edge (1-based), as changed_from_histogram
DEFAULT_EDGE = nearest_edge_index(DEFAULT_TAU)
HEADLINES = {
    "pair": (  # model sparsity at the default τ's histogram edge (contract.changed_from_histogram)
        "sparsity",
        "SELECT 1 - sum(list_sum(h.counts[$start:])) / sum(t.numel), NULL FROM tensors t "
        "JOIN histograms h USING (analysis_id, run, name) WHERE t.analysis_id = $aid AND h.kind = $mode "
        "HAVING sum(t.numel) > 0",
    ),
    "series": (  # moved at some step, not in the final mask: share of all weights
        "transient_share",
        "SELECT c.transient / n.numel, NULL FROM series_categories c, "
        "(SELECT sum(numel) AS numel FROM tensors WHERE analysis_id = $aid) n "
        "WHERE c.analysis_id = $aid AND c.name = '*' AND n.numel > 0",
    ),
    "overlap": (  # o1 = |A∧B|/|A| of the first two runs, against a random mask's
        "overlap_o1",
        "SELECT o1, baseline1 FROM overlap_pairs WHERE analysis_id = $aid AND name = '*' AND a = 0 AND b = 1",
    ),
}


def _checkpoint_row(r: dict) -> dict:
    return {**r, "files": json.loads(r["files"]), "pins": json.loads(r["pins"]) if r.get("pins") else None}


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ResultCache:
    """An LRU of values derived from one analysis's results, bounded in (estimated) bytes.

    Keys are (analysis id, what). A reader takes `version(aid)` before it reads the catalog and
    hands it to `put`, which drops the value when the analysis was ingested again or deleted in
    between: a value computed from rows that were replaced meanwhile is never kept.
    """

    def __init__(self, max_bytes: int = 192 << 20):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def version(self, aid: str) -> int:
        with self._lock:
            return self._versions.get(aid, 0)

    def get(self, key: tuple) -> Any | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: tuple, value: Any, size: int, version: int) -> None:
        with self._lock:
            if self._versions.get(key[0], 0) != version or size > self.max_bytes:
                return
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def invalidate(self, aid: str) -> None:
        with self._lock:
            self._versions[aid] = self._versions.get(aid, 0) + 1
            for key in [k for k in self._items if k[0] == aid]:
                self.bytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        with self._lock:
            for aid in {k[0] for k in self._items}:
                self._versions[aid] = self._versions.get(aid, 0) + 1
            self._items.clear()
            self.bytes = 0


def failpoint(name: str) -> None:
    """Fault tests only: DELTALENS_FAILPOINT=<name> SIGKILLs this process here (tests/test_soak.py)."""
    if os.environ.get("DELTALENS_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Catalog:
    def __init__(self, path: Path):
        self.path = path
        self.db = duckdb.connect(str(path))
        self.lock = threading.RLock()
        self.cache = ResultCache()
        self._idle: list[duckdb.DuckDBPyConnection] = []  # read cursors not in use
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        with self.lock:
            self.db.execute(CATALOG_SQL)
            self.db.execute(SCHEMA_SQL)
            self.db.execute("ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS pins JSON")
            self._add_titles()
            for table in KEYED:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tensor_key VARCHAR")
                self.db.execute(
                    f"UPDATE {table} SET tensor_key = analysis_id || '/' || name WHERE tensor_key IS NULL"
                )
                self.db.execute(f"CREATE INDEX IF NOT EXISTS {table}_tensor_key ON {table} (tensor_key)")

    def _add_titles(self) -> None:
        """Catalogs from before titles: the column, and each stored analysis' default title."""
        self.db.execute("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS title VARCHAR")
        for jid, kind, checkpoints in self.db.execute(
            "SELECT id, kind, checkpoints FROM jobs WHERE title IS NULL"
        ).fetchall():
            self.db.execute(
                "UPDATE jobs SET title = ? WHERE id = ?", [self.default_title(kind, checkpoints), jid]
            )

    def close(self) -> None:
        with self.lock:
            for cursor in self._cursors:
                cursor.close()
            self._cursors.clear()
            self._idle.clear()
            self.cache.clear()
            self.db.close()

    @contextmanager
    def _cursor(self):
        with self.lock:  # pool bookkeeping only; the query itself runs outside the lock
            cursor = self._idle.pop() if self._idle else None
            if cursor is None:
                cursor = self.db.cursor()
                self._cursors.append(cursor)
        try:
            yield cursor
        finally:
            with self.lock:
                if cursor in self._cursors:
                    self._idle.append(cursor)

    def read(self, sql: str, params: list | None = None) -> list[tuple]:
        """A read-only query on a pooled cursor: concurrent with other reads and with writes."""
        with self._cursor() as cursor:
            return cursor.execute(sql, params or []).fetchall()

    def read_rows(self, sql: str, params: list | None = None) -> list[dict]:
        with self._cursor() as cursor:
            cur = cursor.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, params or []).fetchall()

    def rows(self, sql: str, params: list | None = None) -> list[dict]:
        with self.lock:
            cur = self.db.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    # --- checkpoints -------------------------------------------------------------------------
    def add_checkpoint(self, **c: Any) -> None:
        pins = c.get("pins")
        c = {**c, "files": json.dumps(c["files"]), "created_at": now(), "pins": pins and json.dumps(pins)}
        with self.lock:
            self.db.execute(
                f"INSERT INTO checkpoints ({', '.join(CHECKPOINT_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(CHECKPOINT_FIELDS))})",
                [c[k] for k in CHECKPOINT_FIELDS],
            )

    def checkpoint(self, cid: str) -> dict | None:
        found = self.rows("SELECT * FROM checkpoints WHERE id = ?", [cid])
        return _checkpoint_row(found[0]) if found else None

    def checkpoints(self) -> list[dict]:
        return [_checkpoint_row(r) for r in self.rows("SELECT * FROM checkpoints ORDER BY created_at")]

    # --- jobs --------------------------------------------------------------------------------
    def add_job(
        self,
        jid: str,
        kind: str,
        checkpoints: list[str],
        taus: list[float],
        relative: bool,
        rank: bool,
        title: str | None = None,
    ) -> None:
        t, title = now(), title or self.default_title(kind, checkpoints)
        with self.lock:
            self.db.execute(
                "INSERT INTO jobs "
                "(id, kind, status, checkpoints, taus, relative, rank, created_at, updated_at, title) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                [jid, kind, checkpoints, taus, relative, rank, t, t, title],
            )

    def default_title(self, kind: str, checkpoints: list[str]) -> str:
        # a checkpoint id names its checkpoint; an imported analysis' paths are named by their folder
        names = [(self.checkpoint(cid) or {}).get("name", Path(cid).name or cid) for cid in checkpoints]
        if kind not in DEFAULT_TITLES or len(names) < 2:
            return " → ".join(names)[:MAX_TITLE] or kind
        return DEFAULT_TITLES[kind](names[0], names[1:])[:MAX_TITLE]

    def rename_job(self, jid: str, title: str) -> bool:
        """Give an analysis a new title; False when there is no such analysis."""
        with self.lock:
            renamed = self.db.execute("UPDATE jobs SET title = ? WHERE id = ? RETURNING id", [title, jid])
            return bool(renamed.fetchall())

    def headline(self, job: dict) -> dict | None:
        """The list's one figure of a finished analysis (cached until it is ingested again or deleted)."""
        aid, kind = job["id"], job["kind"]
        if job["status"] != "done" or kind not in HEADLINES:
            return None
        found = self.cache.get((aid, "headline"))
        if found is None:
            version = self.cache.version(aid)
            metric, sql = HEADLINES[kind]
            mode = "rel" if job["relative"] else "abs"
            given = {"aid": aid, "start": DEFAULT_EDGE + 3, "mode": mode}
            rows = self.read(sql, {k: v for k, v in given.items() if f"${k}" in sql})
            value, baseline = rows[0] if rows else (None, None)
            tau = BIN_EDGES[DEFAULT_EDGE] if kind == "pair" else job["taus"][0]
            found = dict(metric=metric, value=value, baseline=baseline, tau=tau, relative=job["relative"])
            self.cache.put((aid, "headline"), found, 300, version)
        return found

    def job(self, jid: str) -> dict | None:
        found = self.rows("SELECT * FROM jobs WHERE id = ?", [jid])
        return found[0] if found else None

    def jobs(self, active_only: bool = False) -> list[dict]:
        where = f"WHERE status NOT IN {TERMINAL}" if active_only else ""
        return self.rows(f"SELECT * FROM jobs {where} ORDER BY created_at")

    def update_job(self, jid: str, **fields: Any) -> None:
        fields["updated_at"] = now()
        if "detail" in fields and not isinstance(fields["detail"], str):
            fields["detail"] = json.dumps(fields["detail"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), jid])

    def delete_job(self, jid: str) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            try:
                for table in TABLES:
                    self.db.execute(f"DELETE FROM {table} WHERE analysis_id = ?", [jid])
                self.db.execute("DELETE FROM jobs WHERE id = ?", [jid])
                self.db.execute("COMMIT")
            except Exception:  # all of it or nothing: the job and its rows stay as they were
                self.db.execute("ROLLBACK")
                raise
            finally:
                self.cache.invalidate(jid)

    def ingest(self, jid: str, artifact: Path) -> None:
        """Copy a published artifact's rows in, and mark the job done — all or nothing."""
        with self.lock:
            quoted = artifact.as_posix().replace("'", "''")
            self.db.execute(f"ATTACH '{quoted}' AS artifact (READ_ONLY)")
            try:
                self.db.execute("BEGIN")
                held = {r[0] for r in self.db.execute(QUERY_ARTIFACT_TABLES).fetchall()}
                for i, table in enumerate(TABLES):
                    self.db.execute(f"DELETE FROM {table} WHERE analysis_id = ?", [jid])
                    if table not in held:  # an artifact written before this table existed
                        continue
                    key = ", analysis_id || '/' || name" if table in KEYED else ""
                    self.db.execute(
                        f"INSERT INTO {table} SELECT *{key} FROM artifact.{table} WHERE analysis_id = ?",
                        [jid],
                    )
                    if i == len(TABLES) // 2:
                        failpoint("ingest")
                self.db.execute(
                    "UPDATE jobs SET status = 'done', progress = 1, updated_at = ? WHERE id = ?", [now(), jid]
                )
                self.db.execute("COMMIT")
            except Exception:
                self.db.execute("ROLLBACK")
                raise
            finally:
                self.db.execute("DETACH artifact")
                self.cache.invalidate(jid)

    # --- short links -------------------------------------------------------------------------
    def add_link(self, code: str, url: str) -> str:
        with self.lock:
            self.db.execute("INSERT INTO links VALUES (?, ?, ?) ON CONFLICT DO NOTHING", [code, url, now()])
        return code

    def link_code(self, url: str) -> str | None:
        """The code already made for this view, if any (one view, one link)."""
        found = self.query("SELECT code FROM links WHERE url = ? ORDER BY created_at LIMIT 1", [url])
        return found[0][0] if found else None

    def link(self, code: str) -> str | None:
        found = self.query("SELECT url FROM links WHERE code = ?", [code])
        return found[0][0] if found else None
