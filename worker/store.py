"""Write an analysis as an immutable set of rows into a DuckDB file, published atomically.

The file is built next to its destination under a temporary name (a copy of the existing file
when there is one, so earlier analyses are kept) and renamed over it only when complete: a
reader never sees half an analysis, and a crash leaves the old file untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from deltalens.worker import geometry, precision
from deltalens.worker.analyses import AnalysisResult
from deltalens.worker.contract import BIN_EDGES, SCHEMA_SQL, SCHEMA_VERSION


def _targets(doc: dict) -> list[str]:
    return [doc["target"]] if doc["kind"] == "pair" else doc.get("checkpoints") or doc.get("runs")


def _rows(result: AnalysisResult, aid: str) -> dict[str, list[tuple]]:
    doc = result.document
    taus = doc.get("taus") or [doc["tau"]]
    mode = "rel" if doc["mode"] == "relative" else "abs"
    rows: dict[str, list[tuple]] = {
        t: []
        for t in (
            "tensors",
            "changed",
            "histograms",
            "spectra",
            "update_maps",
            "overlap_regions",
            "overlap_pairs",
            "series_steps",
            "series_categories",
            "skipped",
            "adapter_modules",
            "overlap_stats",
            "upset",
            "series_first_change",
        )
    }
    rows["analyses"] = [
        (
            aid,
            result.kind,
            datetime.now(UTC).replace(tzinfo=None),
            SCHEMA_VERSION,
            doc["base"],
            _targets(doc),
            taus,
            doc["mode"] == "relative",
            result.family,
            result.device,
            list(BIN_EDGES),
            json.dumps(doc),
        )
    ]
    for d in result.details:
        t, run, name = d["row"], d["run"], d["name"]
        rows["tensors"].append(
            (
                aid,
                run,
                name,
                t["source"],
                t["layer"],
                t["block"],
                t["matrix"],
                t["expert"],
                t["shape"],
                t["numel"],
                t["dtype"],
                t.get("norm_delta"),
                t.get("norm_base"),
                t.get("max_abs_delta"),
                d.get("sum_abs_delta"),
                t.get("rank"),
                t.get("full_rank"),
                t.get("rank_pct"),
                t.get("effective_rank"),
                t.get("stable_rank"),
                t.get("rank90"),
                t.get("rank99"),
            )
        )
        if result.kind == "pair":
            for mode in ("abs", "rel"):
                rows["changed"] += [
                    (aid, run, name, mode, tau, c) for tau, c in zip(taus, d[f"changed_{mode}"])
                ]
                rows["histograms"].append((aid, run, name, mode, d[f"hist_{mode}"]))
            if "spectrum" in d:
                rows["spectra"].append((aid, run, name, *d["spectrum"]))
            if "update_map" in d:
                m = d["update_map"]
                rows["update_maps"].append(
                    (
                        aid,
                        run,
                        name,
                        taus[0],
                        m["grid_rows"],
                        m["grid_cols"],
                        m["cells"],
                        m["row_frac"],
                        m["col_frac"],
                        m["head_frac"],
                    )
                )
        elif result.kind == "overlap":
            _overlap_rows(rows, aid, name, t, d["patterns"], len(doc["runs"]), taus[0], mode)
        else:
            _series_rows(rows, aid, name, t)
    if result.kind == "overlap":
        total = [sum(col) for col in zip(*(d["patterns"] for d in result.details))]
        _overlap_rows(rows, aid, "*", doc["summary"], total, len(doc["runs"]), taus[0], mode)
        rows["upset"] += [
            (aid, u["region"], len(u["runs"]), u["exact"], u["inclusive"]) for u in doc["summary"]["upset"]
        ]
    if result.kind == "series":
        _series_rows(rows, aid, "*", doc)
    if result.kind == "pair":
        rows["ulp_histograms"] = precision.store_rows(result.details, aid)
    for adapter in doc.get("adapters", []):
        rows["adapter_modules"] += [
            (
                aid,
                adapter["input"],
                m["name"],
                m["r"],
                m["alpha"],
                m["scale"],
                m["numel"],
                [c["tau"] for c in m["changed"]],
                [c["count"] for c in m["changed"]],
                m["norm_delta"],
                m.get("rank"),
                m.get("full_rank"),
                m.get("singular_values"),
            )
            for m in adapter["modules"]
        ]
    if result.kind == "pair":
        rows.update(geometry.rows(aid, result.details))
    for reason, entries in doc["skipped"].items():
        rows["skipped"] += [(aid, e if isinstance(e, str) else e["name"], reason) for e in entries]
    return rows


def _overlap_rows(rows, aid, name, fig, patterns, runs, tau, mode):
    rows["overlap_regions"] += [
        (aid, name, "".join("1" if code >> k & 1 else "0" for k in range(runs)), n)
        for code, n in enumerate(patterns)
    ]
    rows["overlap_pairs"] += [
        (aid, name, p["a"], p["b"], p["both"], p["o1"], p["o2"], p["baseline1"], p["baseline2"], p["jaccard"])
        for p in fig["pairs"]
    ]
    rows["overlap_stats"] += [
        (
            aid,
            name,
            p["a"],
            p["b"],
            p["both"],
            p["baseline"],
            p["variance"],
            p["lift"],
            p["z"],
            p["same_sign"],
            p.get("baseline_global"),
        )
        for p in fig["pairs"]
    ]
    if name != "*":
        rows["changed"] += [(aid, run, name, mode, tau, c) for run, c in enumerate(fig["changed"])]


def _series_rows(rows, aid, name, fig):
    rows["series_steps"] += [
        (
            aid,
            name,
            i,
            s["checkpoint"],
            s["changed"],
            s["outside_final"],
            s["transient_fraction"],
            s["relative_l2"],
        )
        for i, s in enumerate(fig["steps"])
    ]
    rows["series_first_change"] += [
        (aid, name, i, s["first_changed"], s["kept"], s["reverted"], s["norm_delta"])
        for i, s in enumerate(fig["steps"])
    ]
    c = fig["categories"]
    rows["series_categories"].append((aid, name, c["consistent"], c["transient"], c["untouched"]))


def write_artifact(result: AnalysisResult, out: str | os.PathLike, analysis_id: str | None = None) -> str:
    """Add the analysis to the DuckDB file `out` (created if absent); return its analysis id."""
    out = Path(out)
    aid = analysis_id or uuid.uuid4().hex[:12]
    rows = _rows(result, aid)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{aid}")
    try:
        if out.exists():
            shutil.copyfile(out, tmp)
        with duckdb.connect(str(tmp)) as con:
            con.execute(SCHEMA_SQL)
            if con.execute("SELECT count(*) FROM analyses WHERE analysis_id = ?", [aid]).fetchone()[0]:
                raise ValueError(f"analysis {aid} is already stored in {out}")
            for table, values in rows.items():
                if values:
                    marks = ", ".join("?" * len(values[0]))
                    con.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
            con.execute("CHECKPOINT")
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return aid
