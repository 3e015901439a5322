"""`deltalens up --import FILE`: analyses computed elsewhere (the CLI's `--out` DuckDB file) ingested
into the service's data folder the way a worker's are, so the dashboard shows them like any other.

Each analysis is published as `results/<id>.duckdb` (one analysis per artifact, as a worker writes
it), given a `jobs` row (checkpoints: the paths it compared; detail: `{"imported": FILE}`) and
ingested by `Catalog.ingest` — rows copied in one transaction, status `done`. An analysis whose id
the data folder already holds is left as it is.

`deltalens up` runs this in a child process (`python -P -m deltalens.backend.imports FILE...`,
settings from DELTALENS_*) before it starts the API: only the API's code writes the catalog, and
while an API runs on the folder the catalog is locked, so nothing is imported then (exit 2).
Exit 2 with one line naming the file and the problem for a file that is not a deltalens artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb

from deltalens.backend.catalog import Catalog
from deltalens.worker.artifacts import describe, extract
from deltalens.worker.errors import InputError
from deltalens.worker.settings import get_settings


def import_file(catalog: Catalog, results: Path, source: Path) -> list[str]:
    """Ingest every analysis of `source`; one line per analysis says what happened."""
    lines = []
    for a in describe(source, strict_ids=True):
        aid, artifact = a["analysis_id"], results / f"{a['analysis_id']}.duckdb"
        if catalog.job(aid) is not None or artifact.exists():
            lines.append(f"  {aid} {a['kind']:7} already in the data folder; left as it is")
            continue
        extract(source, aid, artifact)
        try:
            checkpoints = [a["base"], *a["targets"]]
            catalog.add_job(aid, a["kind"], checkpoints, list(a["taus"]), a["relative"], True)
            catalog.update_job(aid, detail={"imported": str(source.resolve())})
            catalog.ingest(aid, artifact)
        except BaseException:
            catalog.delete_job(aid)
            artifact.unlink(missing_ok=True)
            raise
        lines.append(f"  {aid} {a['kind']:7} imported: {' -> '.join(checkpoints)}")
    return lines


def main(argv: list[str]) -> int:
    sources = [Path(f) for f in argv]
    settings = get_settings()
    path = settings.path() / "catalog.duckdb"
    try:
        for source in sources:  # every file checked before the catalog is opened
            describe(source, strict_ids=True)
        catalog = Catalog(path)
    except InputError as e:
        print(f"deltalens: error: {e}", file=sys.stderr)
        return 2
    except duckdb.IOException:  # locked by a running API
        print(
            f"deltalens: error: {path}: in use; stop the deltalens running on this folder first",
            file=sys.stderr,
        )
        return 2
    except duckdb.Error as e:
        print(f"deltalens: error: {path}: cannot be opened ({str(e).splitlines()[0]})", file=sys.stderr)
        return 2
    try:
        for source in sources:
            print(f"importing {source}:", *import_file(catalog, settings.path("results"), source), sep="\n")
    except (InputError, duckdb.Error, OSError) as e:  # that analysis rolled back; those before it stay
        print(f"deltalens: error: {source}: could not import it ({str(e).splitlines()[0]})", file=sys.stderr)
        return 2
    finally:
        catalog.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
