"""The notebook API, `import deltalens as dl`: run an analysis or open a stored one, and read it as
pandas DataFrames and Plotly figures.

    r = dl.analyze("base/", "target/", taus=[1e-5, 1e-3])
    r.tensors                      # one row per matrix: the engine's per-matrix figures
    r.heatmap("sparsity")          # layer × matrix type at the first τ (any τ: tau=…)
    s = dl.series("base/", ["step-100/", "step-200/", "final/"]); s.steps
    o = dl.overlap("base/", ["run-a/", "run-b/"]); o.pairs
    dl.open("results.duckdb")      # a CLI --out file or a service artifact (results/<id>.duckdb)

Every number has one source: the engine computes it (worker/analyses.py), the artifact stores it
(worker/store.py), and the service's read side derives every grid and figure from the artifact
once ingested into a catalog (backend/catalog.py, backend/results.py) — here an in-memory one, so
the notebook, `deltalens report` and the dashboard show the same numbers. Like the CLI, this
module is a client of both sides; neither the engine's modules nor the API import it.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from deltalens.worker.artifacts import describe
from deltalens.worker.contract import DEFAULT_TAU, check_tau

PathLike = str | os.PathLike
METRICS = {  # heatmap metric -> (label, number format); the first seven: backend.results.HEATMAP_METRICS
    "sparsity": ("sparsity (share of weights unchanged)", ".2%"),
    "changed_share": ("share of weights changed", ".2%"),
    "rank_pct": ("rank % of full", ".1f"),
    "effective_rank": ("effective rank, share of full", ".1%"),
    "relative_change": ("‖Δ‖ / ‖W‖", ".2e"),
    "mean_abs_delta": ("mean |Δ|", ".2e"),
    "one_ulp_share": ("share moved by at most one ULP", ".1%"),
    "energy_in_top8": ("energy of ΔW in W₀'s top-8 singular subspaces", ".1%"),  # geometry (pair)
    "rank1_dominance": ("rank-1 dominance σ₁² / ‖ΔW‖²", ".1%"),  # geometry (pair)
    "transient_share": ("transient share (changed on the way, not at the end)", ".1%"),  # series
}
AT_TAU = ("sparsity", "changed_share")  # the others do not depend on τ
GEOMETRY_METRICS = ("energy_in_top8", "rank1_dominance")
OVERLAP_BARS = (  # (pair field, legend, colour): each overlap next to its random baseline, a lighter shade
    ("o1", "overlap |A∧B|/|A|", "#1c6bb0"),
    ("baseline1", "random baseline |B|/N", "#9cc3e6"),
    ("o2", "overlap |A∧B|/|B|", "#c2571a"),
    ("baseline2", "random baseline |A|/N", "#f2b58c"),
)
LAYOUT = dict(template="plotly_white", margin=dict(l=90, r=30, t=60, b=60))


# --- running and opening ----------------------------------------------------------------------
def analyze(
    base: PathLike,
    target: PathLike,
    taus: Sequence[float] = (DEFAULT_TAU,),
    *,
    relative: bool = False,
    rank: bool = True,
    geometry: bool = True,
    device: str | None = None,
    out: PathLike | None = None,
) -> Analysis:
    """base -> target, as `deltalens analyze`: counts at each τ, histograms, rank, geometry.
    With `out`, the analysis is also added to that DuckDB file (as `--out` does)."""
    return _run(
        "pair", [base, target], out, taus=taus, relative=relative, rank=rank, geometry=geometry, device=device
    )


def series(
    base: PathLike,
    checkpoints: Sequence[PathLike],
    tau: float = DEFAULT_TAU,
    *,
    relative: bool = False,
    device: str | None = None,
    out: PathLike | None = None,
) -> Analysis:
    """Checkpoints over training (the last one is the final): transient updates, as `deltalens series`."""
    return _run("series", [base, *checkpoints], out, taus=[tau], relative=relative, device=device)


def overlap(
    base: PathLike,
    runs: Sequence[PathLike],
    tau: float = DEFAULT_TAU,
    *,
    relative: bool = False,
    device: str | None = None,
    out: PathLike | None = None,
) -> Analysis:
    """Runs from one base: do they change the same weights (against chance)? As `deltalens overlap`."""
    return _run("overlap", [base, *runs], out, taus=[tau], relative=relative, device=device)


def _run(kind: str, paths: list, out: PathLike | None, taus: Sequence[float], **options) -> Analysis:
    """The engine, as the CLI runs it, then its artifact (in `out`, or a temporary file) opened."""
    from deltalens.worker.analyses import Options, run_analysis
    from deltalens.worker.store import write_artifact

    opts = Options(taus=[check_tau(t) for t in taus], **options)
    result = run_analysis(kind, [str(p) for p in paths], opts)
    if out is not None:
        return open(out, id=write_artifact(result, out))
    with tempfile.TemporaryDirectory(prefix="deltalens-") as folder:
        artifact = Path(folder) / "analysis.duckdb"
        analysis = open(artifact, id=write_artifact(result, artifact))
    analysis.source = None  # held in memory only
    return analysis


def analyses(path: PathLike) -> pd.DataFrame:
    """The analyses a DuckDB file holds, oldest first: id, kind, created_at, base, targets, taus, relative,
    family (pick one for `open` by its id)."""
    rows = describe(path)
    return pd.DataFrame(rows).drop(columns="schema_version").rename(columns={"analysis_id": "id"})


def open(path: PathLike, id: str | None = None) -> Analysis:
    """One analysis of a CLI `--out` file or a service artifact; `id` picks one of several."""
    found = describe(path)
    if id is None and len(found) > 1:
        listed = ", ".join(f"{a['analysis_id']} ({a['kind']})" for a in found)
        raise ValueError(f"{path} holds {len(found)} analyses: {listed}; pass id=")
    chosen = [a for a in found if id is None or a["analysis_id"] == id]
    if not chosen:
        raise KeyError(f"{path} holds no analysis {id!r}")
    return load(path, chosen)[0]


def load(path: PathLike, found: list[dict] | None = None) -> list[Analysis]:
    """Every analysis of the file (or those `describe` rows), ingested into one in-memory catalog."""
    from deltalens.backend.catalog import Catalog

    found = describe(path) if found is None else found
    catalog = Catalog(Path(":memory:"))
    for a in found:
        aid = a["analysis_id"]
        catalog.add_job(aid, a["kind"], [a["base"], *a["targets"]], list(a["taus"]), a["relative"], True)
        catalog.ingest(aid, Path(path))  # the service's own ingest: rows copied, keyed, marked done
    return [Analysis(catalog, a, str(path)) for a in found]


# --- one analysis -----------------------------------------------------------------------------
class Analysis:
    """One stored analysis: its document, per-matrix table, stored tables and figures."""

    def __init__(self, catalog, meta: dict, source: str | None):
        self._catalog, self.source = catalog, source
        self.id, self.kind, self.base = meta["analysis_id"], meta["kind"], meta["base"]
        self.targets, self.taus, self.relative = list(meta["targets"]), list(meta["taus"]), meta["relative"]
        self.family, self.created_at = meta["family"], meta["created_at"]

    @property
    def mode(self) -> str:
        return "rel" if self.relative else "abs"

    def __repr__(self) -> str:
        return f"<deltalens {self.kind} analysis {self.id}: {self.base} -> {', '.join(self.targets)}>"

    def __str__(self) -> str:
        """The summary the CLI prints."""
        from deltalens.worker.report import SUMMARIES

        return SUMMARIES[self.kind](self.document)

    @cached_property
    def document(self) -> dict:
        """The object `--json` writes (and `GET /api/analyses/{id}/result` serves)."""
        return json.loads(self._results.document_text(self._catalog, self.id))

    @cached_property
    def tensors(self) -> pd.DataFrame:
        """One row per matrix (a fused tensor's parts each): the document's per-matrix figures, lists
        spread into columns: `changed@τ`, `sparsity@τ`, geometry per k, series steps, overlap pairs."""
        taus = self.document.get("taus") or [self.document["tau"]]
        frame = pd.DataFrame([_flat(row, taus) for row in self.document["tensors"]])
        return frame.astype({c: "Int64" for c in ("layer", "expert") if c in frame})  # None stays missing

    def table(self, name: str) -> pd.DataFrame:
        """One stored table's rows of this analysis (contract.SCHEMA_SQL: changed, histograms, spectra…)."""
        from deltalens.worker.contract import TABLES

        if name not in TABLES:
            raise KeyError(f"no table {name!r}; the artifact's tables: {', '.join(TABLES)}")
        rows = self._catalog.read_rows(f"SELECT * FROM {name} WHERE analysis_id = ?", [self.id])
        return pd.DataFrame(rows).drop(columns=["analysis_id", "tensor_key"], errors="ignore")

    def tensor(self, name: str) -> dict:
        """One matrix in detail (histograms, spectrum, update map, geometry), as the dashboard reads it."""
        return json.loads(self._results.tensor_detail(self._catalog, self.id, name))

    # --- figures ---
    def heatmap(
        self, metric: str = "sparsity", tau: float | None = None, mode: str | None = None
    ) -> go.Figure:
        """Layer × matrix type of `metric` (see METRICS); τ snaps to the nearest histogram edge."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}")
        if metric == "transient_share":
            self._need("series", metric)
            grid = self.series_view["transient_heatmap"]
            return _heatmap(grid["layers"], grid["matrices"], grid["share"], *METRICS[metric])
        self._need("pair", metric)
        if metric in GEOMETRY_METRICS:
            g = self._results.geometry(self._catalog, self.id)
            return _heatmap(g["layers"], g["matrices"], g[metric], *METRICS[metric])
        tau = check_tau(self.taus[0] if tau is None else tau)
        h = self._results.heatmap(self._catalog, self.id, metric, tau, mode or self.mode)
        label, fmt = METRICS[metric]
        if metric in AT_TAU:
            label += f" · τ = {h['tau']:.3g} ({'relative' if h['mode'] == 'rel' else 'absolute'})"
        return _heatmap(h["layers"], h["matrices"], h["values"], label, fmt, h["changed"], h["numel"])

    def sparsity_curve(self, mode: str | None = None) -> go.Figure:
        """Model sparsity at every τ (histogram edge)."""
        self._need("pair", "a sparsity curve")
        c = self._results.sparsity_curve(self._catalog, self.id, mode or self.mode)
        fig = go.Figure(go.Scatter(x=c["tau"], y=c["sparsity"], mode="lines", name="sparsity"))
        fig.update_layout(title="sparsity vs τ", xaxis=dict(type="log", title="τ"), **LAYOUT)
        fig.update_yaxes(title="share of weights unchanged", range=[0, 1.02], tickformat=".0%")
        return fig

    @cached_property
    def series_view(self) -> dict:
        """The series figures the dashboard reads: steps, categories, transient heatmap."""
        self._need("series", "series figures")
        return self._results.series(self._catalog, self.id)

    @cached_property
    def overlap_view(self) -> dict:
        """The overlap figures the dashboard reads: pairs against chance, Venn/UpSet regions, per layer."""
        self._need("overlap", "overlap figures")
        return self._results.overlap(self._catalog, self.id)

    @cached_property
    def steps(self) -> pd.DataFrame:
        """Series: one row per checkpoint (changed, not in the final one, transient fraction, ‖Δ‖…)."""
        return pd.DataFrame(self.series_view["steps"])

    @cached_property
    def pairs(self) -> pd.DataFrame:
        """Overlap: one row per pair of runs (both, o1, o2, random baselines, Jaccard, lift, z)."""
        return pd.DataFrame(self.overlap_view["summary"]["pairs"])

    def series_figure(self) -> go.Figure:
        steps, labels = self.series_view["steps"], [_label(c) for c in self.series_view["checkpoints"]]
        fig = go.Figure()
        fig.add_bar(x=labels, y=[s["changed"] for s in steps], name="changed vs base")
        fig.add_bar(x=labels, y=[s["outside_final"] for s in steps], name="of those, not changed at the end")
        fig.add_scatter(
            x=labels, y=[s["transient_fraction"] for s in steps], name="transient fraction", yaxis="y2"
        )
        fig.update_layout(
            title=f"changed weights per checkpoint · τ = {self.taus[0]:g}",
            yaxis=dict(title="weights"),
            yaxis2=dict(
                title="transient fraction", overlaying="y", side="right", range=[0, 1], tickformat=".0%"
            ),
            legend=dict(orientation="h", y=-0.2),
            **LAYOUT,
        )
        return fig

    def categories_figure(self) -> go.Figure:
        c = self.series_view["categories"]
        fig = go.Figure(go.Bar(x=list(c), y=list(c.values()), marker_color=["#2a9d8f", "#e76f51", "#adb5bd"]))
        fig.update_layout(title="weights by fate over the series", yaxis=dict(title="weights"), **LAYOUT)
        return fig

    def overlap_figure(self) -> go.Figure:
        """Per pair of runs: |A∧B|/|A| against the random baseline |B|/N (and the same from B's side)."""
        pairs, runs = self.overlap_view["summary"]["pairs"], [_label(r) for r in self.targets]
        labels = [f"{runs[p['a']]} ∧ {runs[p['b']]}" for p in pairs]
        fig = go.Figure()
        for key, name, colour in OVERLAP_BARS:
            fig.add_bar(x=labels, y=[p[key] for p in pairs], name=name, marker_color=colour)
        fig.update_layout(
            title=f"overlap of update masks · τ = {self.taus[0]:g}",
            barmode="group",
            yaxis=dict(title="share"),
            legend=dict(orientation="h", y=-0.25),
            **LAYOUT,
        )
        return fig

    def upset_figure(self) -> go.Figure:
        """Weights changed in exactly each set of runs (UpSet, distinct mode)."""
        runs = [_label(r) for r in self.targets]
        upset = self.overlap_view["summary"]["upset"]
        labels = [" ∧ ".join(runs[k] for k in u["runs"]) for u in upset]
        fig = go.Figure(go.Bar(x=labels, y=[u["exact"] for u in upset]))
        fig.update_layout(
            title="weights changed in exactly these runs", yaxis=dict(title="weights"), **LAYOUT
        )
        return fig

    def figures(self) -> dict[str, go.Figure]:
        """What `deltalens report` draws for this analysis, by title."""
        if self.kind == "series":
            return {
                "changed per checkpoint": self.series_figure(),
                "fate of weights": self.categories_figure(),
                "transient share by layer": self.heatmap("transient_share"),
            }
        if self.kind == "overlap":
            return {"overlap against chance": self.overlap_figure(), "UpSet": self.upset_figure()}
        out = {f"sparsity at τ = {t:g}": self.heatmap("sparsity", t) for t in self.taus}
        if self.tensors.get("rank_pct") is not None and self.tensors["rank_pct"].notna().any():
            out["rank by layer"] = self.heatmap("rank_pct")
        out["relative change by layer"] = self.heatmap("relative_change")
        out["sparsity vs τ"] = self.sparsity_curve()
        if self._catalog.read("SELECT 1 FROM geometry WHERE analysis_id = ? LIMIT 1", [self.id]):
            out["geometry: energy in top-8"] = self.heatmap("energy_in_top8")
            out["geometry: rank-1 dominance"] = self.heatmap("rank1_dominance")
        return out

    def report(self, path: PathLike) -> Path:
        """This analysis as one self-contained HTML file (see `deltalens report`)."""
        from deltalens.worker.html_report import write_report

        return write_report([self], path)

    # --- helpers ---
    @property
    def _results(self):
        from deltalens.backend import results

        return results

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(f"{what}: only {kind} analyses have it; {self.id} is a {self.kind} analysis")


# --- tables and figures -----------------------------------------------------------------------
def _geometry_columns(g: dict | None, taus) -> dict:
    """A matrix's principal geometry: energy and intruders per k, rank-1 dominance, enrichment ratios."""
    if not g or "k" not in g:
        return {}
    out = {"rank1_dominance": g.get("rank1_dominance")}
    for i, k in enumerate(g["k"]):
        out[f"energy_in_top{k}"] = g["energy_in_topk"][i] if g.get("energy_in_topk") else None
        out[f"intruders_top{k}"] = g["intruders"]["count"][i]
    for selector in ("magnitude", "principal"):
        for e in g.get("enrichment", {}).get(selector, []):
            out[f"enrichment_{selector}_{e['percent']}pct"] = e["ratio"]
    return out


SPREAD = {  # a list or object field of a document row -> its columns (other lists and objects are left out)
    "changed": lambda v, taus: (
        {f"changed@{c['tau']:g}": c["count"] for c in v}
        if v and isinstance(v[0], dict)
        else {f"changed[{run}]": n for run, n in enumerate(v)}  # overlap: per run
    ),
    "sparsity": lambda v, taus: {f"sparsity@{t:g}": s for t, s in zip(taus, v)},
    "geometry": _geometry_columns,
    "steps": lambda v, taus: {
        f"{key}[{i}]": s[key]
        for i, s in enumerate(v)
        for key in ("changed", "transient_fraction", "relative_l2")
    },
    "categories": lambda v, taus: dict(v),
    "pairs": lambda v, taus: {
        f"{key}[{p['a']}&{p['b']}]": p.get(key) for p in v for key in ("both", "jaccard", "lift", "z")
    },
    "venn": lambda v, taus: {f"region[{r}]": n for r, n in v.items()},
}


def _flat(row: dict, taus: list[float]) -> dict:
    out = {}
    for key, value in row.items():
        if key in SPREAD:
            out.update(SPREAD[key](value, taus) if value is not None else {})
        elif key == "shape" or not isinstance(value, list | dict):
            out[key] = value
    return out


def _layer_label(layer: int | None) -> str:
    return "other" if layer is None else f"layer {layer}"  # as the dashboard (frontend/src/charts.ts)


def _short(path: str) -> str:
    """A checkpoint's last two path parts: enough to tell runs apart in a legend."""
    return "/".join(Path(path).parts[-2:])


def _label(path: str) -> str:
    """A path as Plotly text: its pseudo-HTML escaped (names are data)."""
    return html.escape(_short(path))


def _heatmap(layers, matrices, z, title: str, fmt: str, changed=None, numel=None) -> go.Figure:
    """A layer × matrix-type grid; cells print their value while the grid is small enough to read."""
    hover = f"%{{y}} · %{{x}}<br>%{{z:{fmt}}}"
    extra = {}
    if changed is not None:
        extra["customdata"] = [[[c, n] for c, n in zip(cr, nr)] for cr, nr in zip(changed, numel)]
        hover += "<br>changed %{customdata[0]:,} of %{customdata[1]:,}"
    if len(layers) * len(matrices) <= 200:
        extra["texttemplate"] = f"%{{z:{fmt}}}"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[html.escape(m) for m in matrices],  # Plotly reads names as pseudo-HTML
            y=[_layer_label(la) for la in layers],
            colorscale="Viridis",
            colorbar=dict(tickformat=fmt),
            hoverongaps=False,
            hovertemplate=hover + "<extra></extra>",
            **extra,
        )
    )
    fig.update_layout(title=title, height=max(320, 120 + 28 * len(layers)), **LAYOUT)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig
