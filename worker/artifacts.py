"""What a DuckDB file holds, checked before anything reads it: the CLI's `--out` file or a service
artifact (`results/<id>.duckdb`), with the artifact schema of `contract.SCHEMA_SQL`.

Torch-free (DuckDB only). Used by the notebook API, `deltalens report` and `deltalens up --import`;
a file that is not an artifact is an `InputError` naming it and the problem, and nothing is written.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import duckdb

from deltalens.worker.contract import SCHEMA_SQL, SCHEMA_VERSION, TABLES
from deltalens.worker.errors import InputError

ANALYSIS_ID = re.compile(r"[0-9a-f]{12}")  # what write_artifact and the service make (uuid4().hex[:12])
FIELDS = (
    "analysis_id",
    "kind",
    "created_at",
    "schema_version",
    "base",
    "targets",
    "taus",
    "relative",
    "family",
)
KINDS = ("pair", "series", "overlap")
MAGIC = (8, b"DUCK")  # a DuckDB file's format marker: offset, bytes
# the files are untrusted: DuckDB must not fetch or load an extension to read another format (SQLite…)
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# ... nor read any other file (a view over read_text('~/.env') would run when the file is read)
SEALED = {**NO_EXTENSIONS, "enable_external_access": False}
# an artifact holds tables only: a view or macro is code the file's author chose to run here
CODE = (
    "SELECT (SELECT count(*) FROM duckdb_views() WHERE NOT internal)"
    " + (SELECT count(*) FROM duckdb_functions() WHERE function_type LIKE '%macro%' AND NOT internal)"
)


@cache
def schema_columns() -> dict[str, list[str]]:
    """table -> its column names in order, as SCHEMA_SQL creates them."""
    with duckdb.connect() as con:
        con.execute(SCHEMA_SQL)
        return _columns(con)


def _columns(con) -> dict[str, list[str]]:
    rows = con.execute(
        "SELECT c.table_name, c.column_name FROM duckdb_columns() c JOIN duckdb_tables() t"
        " ON c.database_name = t.database_name AND c.schema_name = t.schema_name"
        " AND c.table_name = t.table_name"
        " WHERE c.database_name = current_database() ORDER BY c.table_name, c.column_index"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


def describe(path: str | os.PathLike, strict_ids: bool = False) -> list[dict]:
    """The analyses an artifact holds ({analysis_id, kind, base, targets, taus, relative, ...}, oldest
    first), or InputError: not a file, not DuckDB, a catalog, another schema, no analyses. With
    `strict_ids`, every id must be one the service could have made (it becomes a file name there)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    with path.open("rb") as f:
        if f.read(MAGIC[0] + len(MAGIC[1]))[MAGIC[0] :] != MAGIC[1]:
            raise InputError(path, "not a DuckDB file")
    try:
        with duckdb.connect(str(path), read_only=True, config=SEALED) as con:
            if con.execute(CODE).fetchone()[0]:
                raise InputError(path, "holds views or macros; a deltalens artifact has tables only")
            held = _columns(con)
            problem = _schema_problem(held)
            if problem:
                raise InputError(path, problem)
            cur = con.execute(f"SELECT {', '.join(FIELDS)} FROM analyses ORDER BY created_at, analysis_id")
            found = [dict(zip(FIELDS, row)) for row in cur.fetchall()]
    except duckdb.Error as e:
        raise InputError(path, f"cannot be read ({str(e).splitlines()[0]})") from None
    if not found:
        raise InputError(path, "a deltalens artifact with no analyses in it")
    for a in found:
        if a["schema_version"] != SCHEMA_VERSION:
            raise InputError(
                path,
                f"analysis {a['analysis_id']} has artifact schema {a['schema_version']}; "
                f"this deltalens reads schema {SCHEMA_VERSION}",
            )
        if a["kind"] not in KINDS:
            raise InputError(path, f"analysis {a['analysis_id']} is of an unknown kind {a['kind']!r}")
        if strict_ids and not ANALYSIS_ID.fullmatch(a["analysis_id"]):
            raise InputError(
                path, f"analysis id {a['analysis_id']!r} is not one deltalens makes (12 hex digits)"
            )
    return found


def _schema_problem(held: dict[str, list[str]]) -> str | None:
    if "jobs" in held and "checkpoints" in held:
        return (
            "a deltalens catalog (the service's catalog.duckdb), not an artifact: use its results/<id>.duckdb"
        )
    if "analyses" not in held:
        return "not a deltalens artifact (it has no analyses table)"
    expected = schema_columns()
    for table in TABLES:
        if table in held and held[table] != expected[table]:
            return f"not a deltalens artifact of this version (table {table} has other columns)"
    return None


def extract(source: str | os.PathLike, analysis_id: str, dest: str | os.PathLike) -> Path:
    """Copy one analysis out of `source` into a new artifact `dest`, published by rename (as a worker
    publishes its own): a reader never sees half of it, and an existing `dest` is never replaced
    (FileExistsError)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-import")
    quoted = Path(source).resolve().as_posix().replace("'", "''")
    try:
        with duckdb.connect(str(tmp), config=NO_EXTENSIONS) as con:
            con.execute(SCHEMA_SQL)
            con.execute(f"ATTACH '{quoted}' AS source (READ_ONLY)")
            tables = "SELECT table_name FROM duckdb_tables() WHERE database_name = 'source'"
            held = {row[0] for row in con.execute(tables).fetchall()}
            for table in TABLES:
                if table in held:  # an artifact written before a table existed has none of it
                    con.execute(
                        f"INSERT INTO {table} SELECT * FROM source.{table} WHERE analysis_id = ?",
                        [analysis_id],
                    )
            con.execute("DETACH source")
            con.execute("CHECKPOINT")
        os.link(tmp, dest)  # FileExistsError rather than replacing what is stored there
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return dest
