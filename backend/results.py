"""Read-side queries over ingested results: summaries, layer × matrix heatmaps at any τ (from the
stored histograms, no recomputation), one matrix in detail, comparisons of analyses."""
from __future__ import annotations

import json
import math
from collections import defaultdict

from backend.catalog import Catalog
from backend.errors import ApiError, not_found
from worker.contract import BIN_EDGES, MATRIX_TYPES, changed_from_histogram, nearest_edge_index

# metric -> (what it needs summed per cell, how the cell value follows from the sums)
HEATMAP_METRICS = {
    "sparsity": lambda s: 1 - s["changed"] / s["numel"],
    "changed_share": lambda s: s["changed"] / s["numel"],
    "rank_pct": lambda s: s["rank_pct"] / s["ranked"] if s["ranked"] else None,
    "effective_rank": lambda s: s["effective_rank"] / s["ranked"] if s["ranked"] else None,
    "relative_change": lambda s: math.sqrt(s["sq_delta"]) / math.sqrt(s["sq_base"]) if s["sq_base"] else None,
    "mean_abs_delta": lambda s: s["sum_abs"] / s["numel"],
}


def document(catalog: Catalog, aid: str) -> dict:
    found = catalog.query("SELECT result_json FROM analyses WHERE analysis_id = ?", [aid])
    if not found:
        job = catalog.job(aid)
        if job is None:
            raise not_found("analysis", aid)
        raise ApiError(409, "not_ready", f"analysis {aid} is {job['status']}; results appear when it is done")
    return json.loads(found[0][0])


def snap_tau(tau: float) -> tuple[float, int | None]:
    """The histogram edge a τ snaps to (τ = 0 is the exact-zero bin)."""
    if tau == 0:
        return 0.0, None
    if not (math.isfinite(tau) and tau > 0):
        raise ApiError(422, "invalid_request", "tau must be a finite number >= 0")
    k = nearest_edge_index(tau)
    return BIN_EDGES[k], k


def _changed(counts: list[int], edge: int | None) -> int:
    return sum(counts[1:]) if edge is None else changed_from_histogram(counts, edge)


def heatmap(catalog: Catalog, aid: str, metric: str, tau: float, mode: str) -> dict:
    doc = document(catalog, aid)
    if doc["kind"] != "pair":
        raise ApiError(409, "wrong_kind", f"heatmaps are drawn for pair analyses; {aid} is a {doc['kind']}")
    if metric not in HEATMAP_METRICS:
        raise ApiError(422, "invalid_request", f"metric must be one of {', '.join(HEATMAP_METRICS)}")
    snapped, edge = snap_tau(tau)
    rows = catalog.rows(
        "SELECT t.layer, t.matrix, t.numel, t.norm_delta, t.norm_base, t.sum_abs_delta, t.rank_pct, t.effective_rank, "
        "h.counts FROM tensors t JOIN histograms h USING (analysis_id, run, name) "
        "WHERE t.analysis_id = ? AND h.kind = ?", [aid, mode])
    cells: dict = defaultdict(lambda: defaultdict(float))
    for r in rows:
        s = cells[(r["layer"], r["matrix"])]
        s["numel"] += r["numel"]
        s["changed"] += _changed(r["counts"], edge)
        s["sq_delta"] += (r["norm_delta"] or 0) ** 2
        s["sq_base"] += (r["norm_base"] or 0) ** 2
        s["sum_abs"] += r["sum_abs_delta"] or 0
        if r["rank_pct"] is not None:
            s["ranked"] += 1
            s["rank_pct"] += r["rank_pct"]
            s["effective_rank"] += r["effective_rank"]
    layers = sorted({k[0] for k in cells}, key=lambda x: (x is None, x or 0))
    matrices = [m for m in MATRIX_TYPES if any(k[1] == m for k in cells)]
    value = HEATMAP_METRICS[metric]
    grid = lambda f: [[f(cells[(layer, m)]) if (layer, m) in cells else None for m in matrices] for layer in layers]  # noqa: E731
    return {"analysis": aid, "metric": metric, "mode": mode, "tau": snapped, "tau_requested": tau,
            "layers": layers, "matrices": matrices, "values": grid(value),
            "changed": grid(lambda s: int(s["changed"])), "numel": grid(lambda s: int(s["numel"]))}


def heatmap_cube(catalog: Catalog, aid: str, mode: str) -> dict:
    """Per layer × matrix cell, the summed histogram: the dashboard's τ slider reads any τ from it."""
    doc = document(catalog, aid)
    if doc["kind"] != "pair":
        raise ApiError(409, "wrong_kind", f"heatmaps are drawn for pair analyses; {aid} is a {doc['kind']}")
    cells: dict = {}
    for layer, matrix, numel, counts in catalog.query(
            "SELECT t.layer, t.matrix, t.numel, h.counts FROM tensors t JOIN histograms h USING (analysis_id, run, name) "
            "WHERE t.analysis_id = ? AND h.kind = ?", [aid, mode]):
        n, hist = cells.get((layer, matrix), (0, [0] * len(counts)))
        cells[(layer, matrix)] = (n + numel, [a + b for a, b in zip(hist, counts)])
    layers = sorted({k[0] for k in cells}, key=lambda x: (x is None, x or 0))
    matrices = [m for m in MATRIX_TYPES if any(k[1] == m for k in cells)]
    pick = lambda i: [[cells[(layer, m)][i] if (layer, m) in cells else None for m in matrices] for layer in layers]  # noqa: E731
    return {"analysis": aid, "mode": mode, "layers": layers, "matrices": matrices, "numel": pick(0), "hist": pick(1),
            "bin_edges": list(BIN_EDGES)}


def sparsity_curve(catalog: Catalog, aid: str, mode: str) -> dict:
    """Model sparsity at every histogram edge: the whole sparsity-vs-τ curve."""
    document(catalog, aid)
    rows = catalog.query("SELECT h.counts, t.numel FROM tensors t JOIN histograms h USING (analysis_id, run, name) "
                         "WHERE t.analysis_id = ? AND h.kind = ?", [aid, mode])
    total = [0] * (len(BIN_EDGES) + 2)
    for counts, _ in rows:
        total = [a + b for a, b in zip(total, counts)]
    numel = sum(n for _, n in rows)
    return {"analysis": aid, "mode": mode, "tau": list(BIN_EDGES),
            "sparsity": [1 - changed_from_histogram(total, k) / numel for k in range(len(BIN_EDGES))],
            "zero_share": total[0] / numel if numel else None}


def tensor_detail(catalog: Catalog, aid: str, name: str) -> dict:
    document(catalog, aid)
    found = catalog.rows("SELECT * FROM tensors WHERE analysis_id = ? AND name = ?", [aid, name])
    if not found:
        raise not_found("tensor", name)
    out = {k: v for k, v in found[0].items() if k != "analysis_id"}
    out["histograms"] = {kind: counts for kind, counts in catalog.query(
        "SELECT kind, counts FROM histograms WHERE analysis_id = ? AND name = ?", [aid, name])}
    out["bin_edges"] = list(BIN_EDGES)
    spectrum = catalog.rows("SELECT idx, sigma FROM spectra WHERE analysis_id = ? AND name = ?", [aid, name])
    out["spectrum"] = spectrum[0] if spectrum else None
    maps = catalog.rows("SELECT tau, grid_rows, grid_cols, cells, row_frac, col_frac, head_frac FROM update_maps "
                        "WHERE analysis_id = ? AND name = ?", [aid, name])
    out["update_map"] = maps[0] if maps else None
    out["changed"] = [{"mode": m, "tau": t, "count": c} for m, t, c in catalog.query(
        "SELECT mode, tau, count FROM changed WHERE analysis_id = ? AND name = ? ORDER BY mode, tau", [aid, name])]
    return out


def compare(catalog: Catalog, ids: list[str], tau: float, mode: str) -> dict:
    """Per-layer and model sparsity of several pair analyses side by side (e.g. SFT vs RL stage)."""
    snapped, edge = snap_tau(tau)
    out = []
    for aid in ids:
        doc = document(catalog, aid)
        if doc["kind"] != "pair":
            raise ApiError(409, "wrong_kind", f"only pair analyses can be compared; {aid} is a {doc['kind']}")
        per_layer: dict = defaultdict(lambda: [0, 0])
        for layer, numel, counts in catalog.query(
                "SELECT t.layer, t.numel, h.counts FROM tensors t JOIN histograms h USING (analysis_id, run, name) "
                "WHERE t.analysis_id = ? AND h.kind = ?", [aid, mode]):
            per_layer[layer][0] += _changed(counts, edge)
            per_layer[layer][1] += numel
        changed = sum(c for c, _ in per_layer.values())
        numel = sum(n for _, n in per_layer.values())
        out.append({"analysis": aid, "base": doc["base"], "target": doc["target"], "sparsity": 1 - changed / numel,
                    "layers": [{"layer": k, "sparsity": 1 - c / n, "changed": c, "numel": n}
                               for k, (c, n) in sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]})
    return {"tau": snapped, "mode": mode, "analyses": out}
