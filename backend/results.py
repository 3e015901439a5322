"""Read-side queries over ingested results: summaries, layer × matrix heatmaps at any τ (from the
stored histograms, no recomputation), one matrix in detail, series and overlap figures (from their
tables), comparisons of analyses."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np

from deltalens.backend.catalog import Catalog
from deltalens.backend.errors import ApiError, not_found
from deltalens.worker import geometry as geometry_figures
from deltalens.worker import mask_stats
from deltalens.worker.contract import (
    BIN_EDGES,
    MATRIX_TYPES,
    TAU_RULE,
    ULP_EDGES,
    VISIBILITY_FLOOR,
    changed_from_histogram,
    nearest_edge_index,
    valid_tau,
)

# metric -> (what it needs summed per cell, how the cell value follows from the sums)
HEATMAP_METRICS = {
    "sparsity": lambda s: 1 - s["changed"] / s["numel"],
    "changed_share": lambda s: s["changed"] / s["numel"],
    "rank_pct": lambda s: s["rank_pct"] / s["ranked"] if s["ranked"] else None,
    # as a share of full rank (min(m, n)), averaged over the cell's ranked matrices, like rank_pct
    "effective_rank": lambda s: s["effective_rank"] / s["ranked"] if s["ranked"] else None,
    "relative_change": lambda s: math.sqrt(s["sq_delta"]) / math.sqrt(s["sq_base"]) if s["sq_base"] else None,
    "mean_abs_delta": lambda s: s["sum_abs"] / s["numel"],
    # from the ulp_histograms table (_ulp_cells): weights moved by at most one ULP / weights with a ULP grid
    "one_ulp_share": lambda s: s["one_ulp"] / s["ulp_numel"] if s.get("ulp_numel") else None,
}


def document_text(catalog: Catalog, aid: str) -> str:
    """The result document as stored: the JSON text `--json` writes (served as is, never re-encoded)."""
    found = catalog.read("SELECT result_json FROM analyses WHERE analysis_id = ?", [aid])
    if not found:
        _not_ready(catalog, aid)
    return found[0][0]


def document(catalog: Catalog, aid: str) -> dict:
    return json.loads(document_text(catalog, aid))


def _not_ready(catalog: Catalog, aid: str):
    job = catalog.job(aid)
    if job is None:
        raise not_found("analysis", aid)
    raise ApiError(409, "not_ready", f"analysis {aid} is {job['status']}; results appear when it is done")


def _meta(catalog: Catalog, aid: str) -> dict:
    """kind, base, targets and taus of a finished analysis, without parsing its whole result document."""
    key = (aid, "meta")
    meta = catalog.cache.get(key)
    if meta is None:
        version = catalog.cache.version(aid)
        found = catalog.read("SELECT kind, base, targets, taus FROM analyses WHERE analysis_id = ?", [aid])
        if not found:
            _not_ready(catalog, aid)
        meta = dict(zip(("kind", "base", "targets", "taus"), found[0]))
        catalog.cache.put(key, meta, 200, version)
    return meta


SUMMED = ("numel", "sq_delta", "sq_base", "sum_abs", "ranked", "rank_pct", "effective_rank")


class Cells:
    """One pair analysis's tensors summed per layer × matrix cell, in one mode: what every heatmap,
    the τ cube, the sparsity curve and the comparison are read from (immutable once built)."""

    def __init__(self, rows: list[tuple]):
        sums: dict = {}
        hists: dict = {}
        for layer, matrix, numel, norm_delta, norm_base, sum_abs, rank_pct, effective, full, counts in rows:
            s = sums.get((layer, matrix))
            if s is None:
                s = sums[(layer, matrix)] = dict.fromkeys(SUMMED, 0.0)
                hists[(layer, matrix)] = np.zeros(len(counts), np.int64)
            s["numel"] += numel
            s["sq_delta"] += (norm_delta or 0) ** 2
            s["sq_base"] += (norm_base or 0) ** 2
            s["sum_abs"] += sum_abs or 0
            if rank_pct is not None:
                s["ranked"] += 1
                s["rank_pct"] += rank_pct
                s["effective_rank"] += effective / full if full else 0.0
            hists[(layer, matrix)] += np.asarray(counts, np.int64)
        self.layers = sorted({k[0] for k in sums}, key=_layer_order)
        self.matrices = [m for m in MATRIX_TYPES if any(k[1] == m for k in sums)]
        self.keys = list(sums)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.sums = [sums[k] for k in self.keys]
        self.numel = [int(s["numel"]) for s in self.sums]
        width = len(next(iter(hists.values()))) if hists else len(BIN_EDGES) + 2
        self.hist = np.stack([hists[k] for k in self.keys]) if hists else np.zeros((0, width), np.int64)
        # suffix[:, j] = sum of bins j.. (exact int64): values above an edge in O(1) per cell
        self.suffix = np.cumsum(self.hist[:, ::-1], axis=1)[:, ::-1]
        self.nbytes = self.hist.nbytes * 2 + 400 * len(self.keys) + 1000

    def changed(self, edge: int | None) -> list[int]:
        """Per cell, values > BIN_EDGES[edge] (edge None: values != 0), as changed_from_histogram counts."""
        column = 1 if edge is None else edge + 2
        if column >= self.suffix.shape[1]:
            return [0] * len(self.keys)
        return self.suffix[:, column].tolist()

    def grid(self, values: list) -> list[list]:
        return [
            [values[self.index[(layer, m)]] if (layer, m) in self.index else None for m in self.matrices]
            for layer in self.layers
        ]


def _cells(catalog: Catalog, aid: str, mode: str) -> Cells:
    key = (aid, "cells", mode)
    cells = catalog.cache.get(key)
    if cells is None:
        version = catalog.cache.version(aid)
        cells = Cells(
            catalog.read(
                "SELECT t.layer, t.matrix, t.numel, t.norm_delta, t.norm_base, t.sum_abs_delta, t.rank_pct, "
                "t.effective_rank, t.full_rank, h.counts "
                "FROM tensors t JOIN histograms h USING (analysis_id, run, name) "
                "WHERE t.analysis_id = ? AND h.kind = ?",
                [aid, mode],
            )
        )
        catalog.cache.put(key, cells, cells.nbytes, version)
    return cells


def snap_tau(tau: float) -> tuple[float, int | None]:
    """The histogram edge a τ snaps to (τ = 0 is the exact-zero bin)."""
    if tau == 0:
        return 0.0, None
    if not valid_tau(tau):
        raise ApiError(422, "invalid_request", TAU_RULE)
    k = nearest_edge_index(tau)
    return BIN_EDGES[k], k


def _kind(catalog: Catalog, aid: str, kind: str, what: str) -> dict:
    """The analysis's meta, or 409 wrong_kind when it is not of this kind."""
    meta = _meta(catalog, aid)
    if meta["kind"] != kind:
        raise ApiError(409, "wrong_kind", f"{what} {kind} analyses; {aid} is a {meta['kind']}")
    return meta


def _layer_order(layer: int | None) -> tuple[bool, int]:
    return layer is None, layer or 0


def heatmap(catalog: Catalog, aid: str, metric: str, tau: float, mode: str) -> dict:
    _kind(catalog, aid, "pair", "heatmaps are drawn for")
    if metric not in HEATMAP_METRICS:
        raise ApiError(422, "invalid_request", f"metric must be one of {', '.join(HEATMAP_METRICS)}")
    snapped, edge = snap_tau(tau)
    cells = _cells(catalog, aid, mode)
    changed = cells.changed(edge)
    value = HEATMAP_METRICS[metric]
    ulp = _ulp_cells(catalog, aid) if metric == "one_ulp_share" else {}
    values = [
        value({**s, "changed": c, **ulp.get(k, {})}) for k, s, c in zip(cells.keys, cells.sums, changed)
    ]
    return {
        "analysis": aid,
        "metric": metric,
        "mode": mode,
        "tau": snapped,
        "tau_requested": tau,
        "layers": cells.layers,
        "matrices": cells.matrices,
        "values": cells.grid(values),
        "changed": cells.grid(changed),
        "numel": cells.grid(cells.numel),
    }


def _ulp_cells(catalog: Catalog, aid: str) -> dict:
    """Per layer × matrix cell: Σ one-ULP counts and Σ weights of the tensors with a ULP histogram."""
    key = (aid, "ulp_cells")
    cells = catalog.cache.get(key)
    if cells is None:
        version = catalog.cache.version(aid)
        cells = {
            (layer, matrix): {"one_ulp": int(one), "ulp_numel": int(numel)}
            for layer, matrix, one, numel in catalog.read(
                "SELECT t.layer, t.matrix, sum(u.one_ulp), sum(t.numel) FROM tensors t "
                "JOIN ulp_histograms u USING (analysis_id, run, name) WHERE t.analysis_id = ? "
                "GROUP BY ALL",
                [aid],
            )
        }
        catalog.cache.put(key, cells, 200 * len(cells) + 100, version)
    return cells


def tensor_changed(catalog: Catalog, aid: str, tau: float, mode: str) -> dict:
    """Per matrix, weights changed at τ (snapped to an edge) from its stored histogram: the dashboard's
    tensor table at any τ of its slider, one request per τ."""
    _kind(catalog, aid, "pair", "counts at any τ are read for")
    snapped, edge = snap_tau(tau)
    key = (aid, "tensor_suffix", mode)
    cached = catalog.cache.get(key)
    if cached is None:
        version = catalog.cache.version(aid)
        rows = catalog.read(
            "SELECT name, counts FROM histograms WHERE analysis_id = ? AND kind = ? ORDER BY name",
            [aid, mode],
        )
        width = len(rows[0][1]) if rows else len(BIN_EDGES) + 2
        hist = np.asarray([counts for _, counts in rows], np.int64).reshape(len(rows), width)
        suffix = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # suffix[:, j]: counts in bins j..
        cached = ([name for name, _ in rows], suffix)
        catalog.cache.put(key, cached, suffix.nbytes + 200 * len(rows) + 100, version)
    names, suffix = cached
    column = 1 if edge is None else edge + 2
    changed = suffix[:, column].tolist() if column < suffix.shape[1] else [0] * len(names)
    return {
        "analysis": aid,
        "mode": mode,
        "tau": snapped,
        "tau_requested": tau,
        "names": names,
        "changed": changed,
    }


def heatmap_cube(catalog: Catalog, aid: str, mode: str) -> dict:
    """Per layer × matrix cell, the summed histogram: the dashboard's τ slider reads any τ from it."""
    _kind(catalog, aid, "pair", "heatmaps are drawn for")
    cells = _cells(catalog, aid, mode)
    return {
        "analysis": aid,
        "mode": mode,
        "layers": cells.layers,
        "matrices": cells.matrices,
        "numel": cells.grid(cells.numel),
        "hist": cells.grid(cells.hist.tolist()),
        "bin_edges": list(BIN_EDGES),
    }


def sparsity_curve(catalog: Catalog, aid: str, mode: str) -> dict:
    """Model sparsity at every histogram edge: the whole sparsity-vs-τ curve."""
    # a series/overlap stores no |Δ| histograms to read a curve from
    _kind(catalog, aid, "pair", "sparsity curves are drawn for")
    cells = _cells(catalog, aid, mode)
    total = cells.hist.sum(axis=0).tolist()
    numel = sum(cells.numel)
    return {
        "analysis": aid,
        "mode": mode,
        "tau": list(BIN_EDGES),
        "sparsity": [1 - changed_from_histogram(total, k) / numel for k in range(len(BIN_EDGES))],
        "zero_share": total[0] / numel if numel else None,
    }


def tensor_detail(catalog: Catalog, aid: str, name: str) -> str:
    """One matrix in detail, as JSON text (served as is: no parse / re-encode per request)."""
    key = (aid, "tensor", name)
    cached = catalog.cache.get(key)
    if cached is not None:
        return cached
    version = catalog.cache.version(aid)
    _meta(catalog, aid)
    by_key = [f"{aid}/{name}"]  # one indexed key per matrix (see catalog.KEYED)
    found = catalog.read_rows("SELECT * EXCLUDE (tensor_key) FROM tensors WHERE tensor_key = ?", by_key)
    if not found:
        raise not_found("tensor", name)
    out = {k: v for k, v in found[0].items() if k != "analysis_id"}
    out["histograms"] = {
        kind: counts
        for kind, counts in catalog.read("SELECT kind, counts FROM histograms WHERE tensor_key = ?", by_key)
    }
    out["bin_edges"] = list(BIN_EDGES)
    spectrum = catalog.read_rows("SELECT idx, sigma FROM spectra WHERE tensor_key = ?", by_key)
    out["spectrum"] = spectrum[0] if spectrum else None
    maps = catalog.read_rows(
        "SELECT tau, grid_rows, grid_cols, cells, row_frac, col_frac, head_frac FROM update_maps "
        "WHERE tensor_key = ?",
        by_key,
    )
    out["update_map"] = maps[0] if maps else None
    ulp = catalog.read_rows(
        "SELECT dtype, counts, one_ulp FROM ulp_histograms WHERE analysis_id = ? AND name = ?", [aid, name]
    )
    out["ulp_histogram"] = (
        {**ulp[0], "edges": list(ULP_EDGES), "visibility_floor": VISIBILITY_FLOOR[ulp[0]["dtype"]]}
        if ulp
        else None
    )
    out["changed"] = [
        {"mode": m, "tau": t, "count": c}
        for m, t, c in catalog.read(
            "SELECT mode, tau, count FROM changed WHERE tensor_key = ? ORDER BY mode, tau", by_key
        )
    ]
    figures = catalog.read("SELECT figures FROM geometry WHERE analysis_id = ? AND name = ?", [aid, name])
    out["geometry"] = json.loads(figures[0][0]) if figures else None
    encoded = json.dumps(out)
    catalog.cache.put(key, encoded, len(encoded) + 100, version)
    return encoded


def geometry(catalog: Catalog, aid: str) -> dict:
    """Layer × matrix-type grids of a pair's principal geometry, each cell its matrices pooled
    (worker.geometry.pool): energy of ΔW in W₀'s top-8 subspaces, rank-1 dominance, mask enrichment."""
    _kind(catalog, aid, "pair", "geometry is computed for")

    def build() -> dict:
        cells: dict = defaultdict(list)
        for layer, matrix, sq, figures in catalog.read(
            "SELECT t.layer, t.matrix, g.sq_delta, g.figures FROM geometry g "
            "JOIN tensors t ON t.analysis_id = g.analysis_id AND t.name = g.name WHERE g.analysis_id = ?",
            [aid],
        ):
            cells[(layer, matrix)].append((json.loads(figures), sq))
        layers = sorted({k[0] for k in cells}, key=_layer_order)
        matrices = [m for m in MATRIX_TYPES if any(k[1] == m for k in cells)]
        pooled = {k: geometry_figures.pool(v) for k, v in cells.items()}

        def grid(value) -> list[list]:
            return [[value(pooled[(y, m)]) if (y, m) in pooled else None for m in matrices] for y in layers]

        first = next(iter(cells.values()), [({}, 0)])[0][0].get("enrichment", {})
        return {
            "analysis": aid,
            "tau": first.get("tau"),
            "mode": first.get("mode"),
            "layers": layers,
            "matrices": matrices,
            "count": grid(lambda p: p["matrices"]),
            "energy_in_top8": grid(lambda p: p["energy_in_top8"]),
            "rank1_dominance": grid(lambda p: p["rank1_dominance"]),
            "enrichment": [
                {
                    "selector": s,
                    "percent": p,
                    "ratio": grid(lambda c, s=s, i=i: c["enrichment"][s][i]["ratio"]),
                }
                for s in ("magnitude", "principal")
                for i, p in enumerate(geometry_figures.PERCENTS)
            ],
            "model": geometry_figures.pool([x for v in cells.values() for x in v]) if cells else None,
        }

    return _cached(catalog, (aid, "geometry"), build)


def _summed(sums: list[dict]) -> dict:
    """Cell sums (with `changed`) added up: a layer's or the model's, for HEATMAP_METRICS."""
    return {k: sum(s[k] for s in sums) for k in (*SUMMED, "changed")}


def compare(catalog: Catalog, ids: list[str], tau: float, mode: str, metric: str = "sparsity") -> dict:
    """Per-layer and model sparsity and `metric` (one of HEATMAP_METRICS but one_ulp_share) of several
    pair analyses side by side."""
    snapped, edge = snap_tau(tau)
    value = HEATMAP_METRICS[metric]
    out = []
    for aid in ids:
        meta = _kind(catalog, aid, "pair", "comparisons are of")
        cells = _cells(catalog, aid, mode)
        per_layer: dict = defaultdict(list)
        for (layer, _), s, c in zip(cells.keys, cells.sums, cells.changed(edge)):
            per_layer[layer].append({**s, "changed": c})
        layers = [(k, _summed(v)) for k, v in sorted(per_layer.items(), key=lambda kv: _layer_order(kv[0]))]
        model = _summed([s for _, s in layers])
        out.append(
            {
                "analysis": aid,
                "base": meta["base"],
                "target": meta["targets"][0],
                "sparsity": 1 - model["changed"] / model["numel"],
                "value": value(model),
                "layers": [
                    {
                        "layer": k,
                        "sparsity": 1 - s["changed"] / s["numel"],
                        "value": value(s),
                        "changed": int(s["changed"]),
                        "numel": int(s["numel"]),
                    }
                    for k, s in layers
                ],
            }
        )
    return {"tau": snapped, "mode": mode, "metric": metric, "analyses": out}


def _cached(catalog: Catalog, key: tuple, build) -> dict:
    """A small figure derived from one analysis's rows, built once per ingest."""
    value = catalog.cache.get(key)
    if value is None:
        version = catalog.cache.version(key[0])
        value = build()
        catalog.cache.put(key, value, len(json.dumps(value)) + 1000, version)
    return value


def _numel(catalog: Catalog, aid: str) -> int:
    return int(catalog.read("SELECT coalesce(sum(numel), 0) FROM tensors WHERE analysis_id = ?", [aid])[0][0])


def series(catalog: Catalog, aid: str) -> dict:
    """The whole-model figures of a series, read from its tables (rows named '*')."""
    meta = _kind(catalog, aid, "series", "series figures are read from")

    def build() -> dict:
        steps = catalog.read_rows(
            "SELECT checkpoint, changed, outside_final, transient_fraction, relative_l2 FROM series_steps "
            "WHERE analysis_id = ? AND name = '*' ORDER BY step",
            [aid],
        )
        categories = catalog.read_rows(
            "SELECT consistent, transient, untouched FROM series_categories "
            "WHERE analysis_id = ? AND name = '*'",
            [aid],
        )
        first = catalog.read_rows(
            "SELECT first_changed, kept, reverted, norm_delta FROM series_first_change "
            "WHERE analysis_id = ? AND name = '*' ORDER BY step",
            [aid],
        )
        return {
            "base": meta["base"],
            "checkpoints": list(meta["targets"]),
            "tau": meta["taus"][0],
            "numel": _numel(catalog, aid),
            "steps": [s | f for s, f in zip(steps, first)] if first else steps,  # artifacts before: none
            "categories": categories[0],
            "transient_heatmap": _transient_heatmap(catalog, aid),
        }

    return _cached(catalog, (aid, "series"), build)


def _transient_heatmap(catalog: Catalog, aid: str) -> dict:
    """Layer × matrix-type transient share of a series, from its per-tensor categories."""
    rows = catalog.read_rows(
        "SELECT t.layer, t.matrix, t.numel, c.transient FROM series_categories c "
        "JOIN tensors t ON t.analysis_id = c.analysis_id AND t.name = c.name WHERE c.analysis_id = ?",
        [aid],
    )
    return mask_stats.transient_heatmap([r | {"categories": {"transient": r["transient"]}} for r in rows])


def _overlap_stats(catalog: Catalog, aid: str, runs: int) -> dict:
    """Whole-model pair statistics, UpSet rows, and pair figures per matrix type and per layer."""
    model = {
        (r["a"], r["b"]): r
        for r in catalog.read_rows(
            "SELECT a, b, baseline, variance, lift, z, same_sign, baseline_global FROM overlap_stats "
            "WHERE analysis_id = ? AND name = '*'",
            [aid],
        )
    }
    upset = catalog.read_rows(
        "SELECT region, exact, inclusive FROM upset WHERE analysis_id = ? ORDER BY region", [aid]
    )
    upset = sorted(
        ({**u, "runs": [k for k, bit in enumerate(u["region"]) if bit == "1"]} for u in upset),
        key=lambda u: _region_code(u["region"]),
    )
    out = {"model": model, "upset": upset}
    for key in mask_stats.GROUP_KEYS:
        sizes = catalog.read(
            f"SELECT t.{key}, c.run, sum(c.count), any_value(n.numel) FROM changed c "
            "JOIN tensors t USING (tensor_key) "
            f"JOIN (SELECT {key}, sum(numel) AS numel FROM tensors WHERE analysis_id = ? GROUP BY {key}) n "
            f"ON n.{key} IS NOT DISTINCT FROM t.{key} WHERE c.analysis_id = ? GROUP BY t.{key}, c.run",
            [aid, aid],
        )
        groups: dict = {}
        for value, run, count, numel in sizes:
            g = groups.setdefault(
                value, {key: value, "numel": int(numel), "changed": [0] * runs, "pairs": []}
            )
            g["changed"][run] = int(count)
        for value, a, b, both, mean, variance, same in catalog.read(
            f"SELECT t.{key}, s.a, s.b, sum(s.both_count), sum(s.baseline), sum(s.variance), "
            "sum(s.same_sign) "
            "FROM overlap_stats s JOIN tensors t ON t.analysis_id = s.analysis_id AND t.name = s.name "
            f"WHERE s.analysis_id = ? AND s.name <> '*' GROUP BY t.{key}, s.a, s.b ORDER BY s.a, s.b",
            [aid],
        ):
            groups[value]["pairs"].append(
                mask_stats.judged({"a": a, "b": b, "both": int(both)}, mean, variance, int(same))
            )
        out[f"by_{key}"] = [groups[v] for v in sorted(groups, key=mask_stats.order(key))]
    return out


def _region_code(region: str) -> int:
    """'101' (membership bits in run order) -> 0b101 read from run 0 as the lowest bit."""
    return sum(1 << k for k, bit in enumerate(region) if bit == "1")


def overlap(catalog: Catalog, aid: str) -> dict:
    """Whole-model overlap figures and per-layer sums, read from the overlap tables."""
    meta = _kind(catalog, aid, "overlap", "overlap figures are read from")

    def build() -> dict:
        runs = len(meta["targets"])
        regions = sorted(
            catalog.read(
                "SELECT region, count FROM overlap_regions WHERE analysis_id = ? AND name = '*'", [aid]
            ),
            key=lambda r: _region_code(r[0]),
        )
        pairs = catalog.read_rows(
            "SELECT a, b, both_count AS both, o1, o2, baseline1, baseline2, jaccard FROM overlap_pairs "
            "WHERE analysis_id = ? AND name = '*' ORDER BY a, b",
            [aid],
        )
        stats = _overlap_stats(catalog, aid, runs)
        for p in pairs:  # artifacts written before overlap_stats existed have none
            s = stats["model"].get((p["a"], p["b"]))
            if s:
                p.update(
                    mask_stats.judged(p, s["baseline"], s["variance"], s["same_sign"])
                    | {"baseline_global": s["baseline_global"]}
                )
                p["lift_global"] = p["both"] / s["baseline_global"] if s["baseline_global"] else None
        summary = {
            "numel": _numel(catalog, aid),
            "changed": [sum(n for region, n in regions if region[k] == "1") for k in range(runs)],
            "pairs": pairs,
            "upset": stats["upset"],
            "by_matrix": stats["by_matrix"],
            "by_layer": stats["by_layer"],
        }
        if runs <= 3:
            summary["venn"] = {region: n for region, n in regions if "1" in region}
        layers: dict = {}
        for layer, numel in catalog.read(
            "SELECT layer, sum(numel) FROM tensors WHERE analysis_id = ? GROUP BY layer", [aid]
        ):
            layers[layer] = {
                "layer": layer,
                "numel": int(numel),
                "changed": [0] * runs,
                "both": [0] * len(pairs),
            }
        for layer, run, count in catalog.read(
            "SELECT t.layer, c.run, sum(c.count) FROM changed c JOIN tensors t USING (tensor_key) "
            "WHERE c.analysis_id = ? GROUP BY t.layer, c.run",
            [aid],
        ):
            layers[layer]["changed"][run] = int(count)
        column = {(p["a"], p["b"]): i for i, p in enumerate(pairs)}
        for layer, a, b, both in catalog.read(
            "SELECT t.layer, p.a, p.b, sum(p.both_count) FROM overlap_pairs p "
            "JOIN tensors t ON t.analysis_id = p.analysis_id AND t.name = p.name "
            "WHERE p.analysis_id = ? AND p.name <> '*' GROUP BY t.layer, p.a, p.b",
            [aid],
        ):
            layers[layer]["both"][column[(a, b)]] = int(both)
        return {
            "runs": list(meta["targets"]),
            "tau": meta["taus"][0],
            "summary": summary,
            "layers": [layers[k] for k in sorted(layers, key=_layer_order)],
        }

    return _cached(catalog, (aid, "overlap"), build)
