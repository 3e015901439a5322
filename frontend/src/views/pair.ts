// Overview of a pair analysis: key figures, layer × matrix heatmap with a metric selector and a
// τ slider (instant, from the stored histograms), sparsity-vs-τ curve, per-matrix bars, a table of
// every matrix, skipped tensors.
import {
  get,
  type Checkpoint,
  type Heatmap,
  type HeatmapCube,
  type PairSummary,
  type SparsityCurve,
  type TensorChanged,
  type TensorDetail,
  type TensorRow,
} from "../api";
import {
  barsFigure,
  changedAbove,
  curveFigure,
  gridAt,
  heatmapFigure,
  layerLabel,
  metricLabel,
  nearestEdge,
  plotlyText,
} from "../charts";
import type { Context } from "../context";
import { card, h, panel } from "../dom";
import { int, pct, sci, tauText } from "../format";
import { plotInto, replot } from "../plot";
import { overviewPaths } from "../prefetch";
import { METRICS, format, withState, type Metric, type Mode, type Scale } from "../state";
import { maskExport } from "../mask";
import { csvForTables } from "../export";
import { dataTable, type Column } from "../table";
import { adapterPanels, readNotes } from "./adapters";
import { finishedAnalysis } from "./analysis";
import { precisionPanel } from "./precision";
import { geometryPanel } from "./geometry";

export async function renderPair(ctx: Context): Promise<void> {
  const job = await finishedAnalysis(ctx);
  if (!job) return;
  const { root, state } = ctx;
  const id = state.analysis!;
  // While τ is one the analysis was asked for (in its mode), every figure is that τ's exact stored
  // count (in the tensor rows, asked for with the rest), labelled with τ as given; once the slider
  // moves, the histogram edge's true value.
  const atExact = state.mode === (job.relative ? "rel" : "abs") && job.taus.includes(state.tau);
  const changedAt = (tau: number) =>
    get<TensorChanged>(`/api/analyses/${id}/tensor-changed?tau=${tau}&mode=${state.mode}`);
  const paths = overviewPaths(state);
  const [summary, cube, curve, heat, checkpoints, rows] = await Promise.all([
    get<PairSummary>(paths.summary),
    get<HeatmapCube>(paths.cube),
    get<SparsityCurve>(paths.curve),
    get<Heatmap>(paths.heat),
    get<Checkpoint[]>(paths.checkpoints),
    get<ExactRow[]>(paths.tensors),
  ]);
  if (!ctx.alive()) return;
  const edges = cube.bin_edges;
  let k = nearestEdge(edges, state.tau);
  const s = summary.summary;
  let exact = atExact ? summary.taus.indexOf(state.tau) : -1;
  const tauNow = () => (exact >= 0 ? summary.taus[exact] : tauAt(k));
  const exactGrid = () => {
    const changed = cube.layers.map(() => cube.matrices.map((): number | null => null));
    for (const r of rows) {
      const i = cube.layers.indexOf(r.layer ?? null),
        j = cube.matrices.indexOf(r.matrix);
      if (i >= 0 && j >= 0) changed[i][j] = (changed[i][j] ?? 0) + (r.changed?.[exact]?.count ?? 0);
    }
    const sparsity = changed.map((row, i) =>
      row.map((c, j) => (c === null ? null : 1 - c / (cube.numel[i][j] as number))),
    );
    return { changed, sparsity };
  };

  const tauLabel = h("output", { id: "tau-value" });
  const slider = h("input", {
    type: "range",
    min: -1,
    max: edges.length - 1,
    step: 1,
    value: k,
    id: "tau-slider",
    "aria-label": "tolerance τ (histogram edge)",
  });
  const metric = h(
    "select",
    { id: "metric", "aria-label": "metric" },
    ...METRICS.map((m) => h("option", { value: m, selected: m === state.metric }, metricLabel(m))),
  );
  const mode = h(
    "select",
    { id: "mode", "aria-label": "mode" },
    h("option", { value: "abs", selected: state.mode === "abs" }, "absolute |Δ| > τ"),
    h("option", { value: "rel", selected: state.mode === "rel" }, "relative |Δ| > τ·|W|"),
  );
  const scale = h(
    "select",
    { id: "scale", "aria-label": "colour scale" },
    h("option", { value: "linear", selected: state.scale === "linear" }, "linear"),
    h("option", { value: "log", selected: state.scale === "log" }, "log"),
  );
  const sparsityCard = h("div", { class: "value", id: "global-sparsity" });
  const changedCard = h("div", { class: "value", id: "global-changed" });

  const tauAt = (index: number) => (index < 0 ? 0 : edges[index]);
  const heatFigure = () => {
    const usesTau = state.metric === "sparsity" || state.metric === "changed_share";
    const grid = exact >= 0 ? exactGrid() : gridAt(cube, k);
    const values = usesTau
      ? grid.sparsity.map((row) =>
          row.map((v) => (v === null ? null : state.metric === "sparsity" ? v : 1 - v)),
        )
      : heat.values;
    return heatmapFigure({
      layers: cube.layers,
      matrices: cube.matrices,
      values,
      changed: grid.changed,
      numel: cube.numel,
      metric: state.metric,
      scale: state.scale,
      tauLabel: tauText(tauNow()),
    });
  };
  const totals = () => {
    if (exact >= 0) return { changed: s.changed[exact].count, numel: s.numel };
    let changed = 0,
      numel = 0;
    cube.hist.forEach((row, i) =>
      row.forEach((hist, j) => {
        if (hist) {
          changed += changedAbove(hist, k);
          numel += cube.numel[i][j] as number;
        }
      }),
    );
    return { changed, numel };
  };
  const bars = () =>
    barsFigure(
      cube.matrices.map((m, j) => {
        const group = s.by_matrix.find((g) => (g as { matrix?: string }).matrix === m);
        if (exact >= 0 && group) return { label: m, changed: group.changed[exact].count, numel: group.numel };
        let changed = 0,
          numel = 0;
        cube.hist.forEach((row, i) => {
          if (row[j]) {
            changed += changedAbove(row[j]!, k);
            numel += cube.numel[i][j] as number;
          }
        });
        return { label: m, changed, numel };
      }),
      tauText(tauNow()),
    );

  root.replaceChildren(
    h("h1", {}, job.title),
    h(
      "p",
      { class: "muted" },
      `${job.checkpoints.map((c) => checkpoints.find((x) => x.id === c)?.name ?? c).join(" → ")} · `,
      `pair analysis ${id} · ${summary.family} family · ${int(s.numel)} parameters compared · `,
      h("a", { href: `/compare?ids=${id}`, "data-link": true }, "compare with other analyses"),
    ),
    ...warningNotice(summary),
    ...readNotes(summary),
    h(
      "div",
      { class: "cards" },
      card("sparsity at τ (share of weights unchanged)", sparsityCard),
      card("weights changed at τ", changedCard),
      card("parameters compared", int(s.numel)),
      card("mean update rank (% of full)", s.mean_rank_pct === null ? "–" : `${s.mean_rank_pct.toFixed(1)}%`),
      card("min update rank", s.min_rank_pct === null ? "–" : `${s.min_rank_pct.toFixed(1)}%`),
      card(
        "relative change ‖Δ‖/‖W‖",
        s.similarity.relative_l2 === null ? "–" : sci(s.similarity.relative_l2),
      ),
    ),
    h(
      "div",
      { class: "controls" },
      h("label", {}, "metric ", metric),
      h("label", {}, "τ ", slider, tauLabel),
      h("label", {}, "mode ", mode),
      h("label", {}, "colour ", scale),
      maskExport(
        id,
        () => tauNow(),
        () => state.mode === "rel",
      ),
    ),
  );
  const heatPanel = panel(root, "Layer × matrix type — click a cell for that matrix");
  const heatEl = plotInto(
    heatPanel,
    heatFigure(),
    "heatmap of the metric by layer and matrix type",
    (point) => {
      // the axes hold the names as Plotly text (escaped): map the clicked cell back to the data
      const i = cube.layers.findIndex((l) => plotlyText(layerLabel(l)) === point.y);
      const j = cube.matrices.findIndex((m) => plotlyText(m) === point.x);
      const hit = rows.find((t) => t.layer === cube.layers[i] && t.matrix === cube.matrices[j]);
      if (hit) ctx.navigate(withState(state, { view: "tensor", tensor: hit.name, tau: tauNow() }));
    },
    true, // drawn at once (quickheatmap.ts), before Plotly has started
  );
  heatEl.id = "heatmap";
  const row = h("div", { class: "grid2" });
  root.append(row);
  const curvePanel = panel(row, "Sparsity vs τ");
  const barsPanel = panel(row, "By matrix type");
  const curveEl = plotInto(
    curvePanel,
    curveFigure(curve, tauNow(), curve.zero_share),
    "sparsity as a function of tau",
  );
  const barsEl = plotInto(barsPanel, bars(), "sparsity by matrix type");
  const tablePanel = panel(root, "Matrices");
  const tauNote = h("p", { class: "muted caption", id: "matrix-table-tau" });
  const matrixRows = rows.map(matrixRow);
  const setChanged = (names: string[], counts: (number | null)[], tau: number) => {
    const at = new Map(names.map((n, i) => [n, counts[i]]));
    for (const r of matrixRows) r.changed = at.get(r.name) ?? null;
    tauNote.textContent = `changed and sparsity at τ = ${tauText(tau)} (${state.mode === "rel" ? "relative" : "absolute"})`;
  };
  const exactCounts = () =>
    setChanged(
      rows.map((r) => r.name),
      rows.map((r) => r.changed?.[exact]?.count ?? null),
      summary.taus[exact],
    );
  const fetchCounts = async (tau: number) => {
    const c = await changedAt(tau);
    if (ctx.alive() && tau === tauNow()) setChanged(c.names, c.changed, c.tau);
  };
  if (exact >= 0) exactCounts();
  else await fetchCounts(tauNow());
  const table = dataTable<MatrixRow>({
    id: "matrix-table",
    label: "matrices of this analysis",
    columns: matrixColumns(matrixRows),
    rows: matrixRows,
    name: (r) => r.name,
    href: (r) => format(withState(state, { view: "tensor", tensor: r.name, tau: tauNow() })),
    open: (r) => ctx.navigate(withState(state, { view: "tensor", tensor: r.name, tau: tauNow() })),
    sort: state.sort,
    filter: state.filter,
    onState: (sort, filter) => {
      Object.assign(state, { sort, filter, tau: tauNow() });
      ctx.remember(state);
    },
  });
  tablePanel.append(
    h("p", { class: "muted caption" }, "Every matrix compared; click a header to sort, a row to open it."),
    tauNote,
    table.el,
  );
  const skipped = Object.entries(summary.skipped).filter(([, v]) => v.length);
  root.append(...adapterPanels(summary));
  precisionPanel(root, summary);
  const geometrySlot = h("div", {}); // filled when the geometry figures arrive, in this place
  root.append(geometrySlot);
  void geometryPanel(ctx, geometrySlot);
  root.append(
    h(
      "section",
      { class: "panel" },
      h("h2", {}, "Skipped tensors"),
      skipped.length
        ? h(
            "ul",
            {},
            ...skipped.map(([reason, names]) =>
              h(
                "li",
                {},
                `${reason.replace("_", " ")}: `,
                names
                  .map((n) =>
                    typeof n === "string" ? n : `${n.name}${n.shapes ? ` ${JSON.stringify(n.shapes)}` : ""}`,
                  )
                  .join(", "),
              ),
            ),
          )
        : h("p", { class: "muted" }, "None: every tensor was compared."),
    ),
  );

  const update = () => {
    const { changed, numel } = totals();
    tauLabel.textContent =
      exact >= 0
        ? `${tauText(summary.taus[exact])} (requested: exact count)`
        : k < 0
          ? "0 (any change)"
          : tauText(edges[k]);
    sparsityCard.textContent = pct(1 - changed / numel);
    changedCard.textContent = int(changed);
  };
  update();
  slider.addEventListener("input", () => {
    k = Number(slider.value);
    exact = -1;
    update();
    replot(heatEl, heatFigure());
    replot(barsEl, bars());
    replot(curveEl, curveFigure(curve, tauAt(k), curve.zero_share));
  });
  slider.addEventListener("change", () => {
    state.tau = tauNow();
    ctx.remember(state);
    void fetchCounts(state.tau).then(() => table.refresh());
  });
  csvForTables(root);
  metric.addEventListener("change", () =>
    ctx.navigate(withState(state, { metric: metric.value as Metric, tau: tauNow() })),
  );
  mode.addEventListener("change", () =>
    ctx.navigate(withState(state, { mode: mode.value as Mode, tau: tauNow() })),
  );
  scale.addEventListener("change", () =>
    ctx.navigate(withState(state, { scale: scale.value as Scale, tau: tauNow() })),
  );
}

/** A result row with its exact counts at the requested τ values (the analysis's mode). */
type ExactRow = TensorRow & {
  changed?: { tau: number; count: number }[];
  rank_pct?: number | null;
  full_rank?: number | null;
  effective_rank?: number | null;
  relative_change?: number | null;
  geometry?: TensorDetail["geometry"];
};

/** One row of the matrix table: the figures it shows and sorts by (changed: at the page's τ). */
interface MatrixRow {
  name: string;
  layer: number | null;
  matrix: string;
  shape: number[];
  numel: number;
  changed: number | null;
  rank_pct: number | null;
  relative_change: number | null;
  energy8: number | null;
  rank1: number | null;
  enrichment: number | null;
}

function matrixRow(r: ExactRow): MatrixRow {
  const g = r.geometry;
  const k8 = g?.k?.indexOf(8) ?? -1;
  return {
    name: r.name,
    layer: r.layer ?? null,
    matrix: r.matrix,
    shape: r.shape,
    numel: r.numel,
    changed: null,
    rank_pct: r.rank_pct ?? null,
    relative_change: r.relative_change ?? null,
    energy8: k8 >= 0 ? (g!.energy_in_topk?.[k8] ?? null) : null,
    rank1: g?.rank1_dominance ?? null,
    enrichment: g?.enrichment?.magnitude.find((e) => e.percent === 1)?.ratio ?? null,
  };
}

const percent = (v: number | null, digits = 2) => (v === null ? "–" : `${v.toFixed(digits)}%`);

/** The table's columns; geometry's only when some matrix has them. */
function matrixColumns(rows: MatrixRow[]): Column<MatrixRow>[] {
  const sparsity = (r: MatrixRow) => (r.changed === null ? null : 100 * (1 - r.changed / r.numel));
  const columns: Column<MatrixRow>[] = [
    { key: "name", label: "matrix", value: (r) => r.name },
    { key: "layer", label: "layer", value: (r) => r.layer, text: (r) => layerLabel(r.layer) },
    { key: "type", label: "type", value: (r) => r.matrix },
    {
      key: "shape",
      label: "shape",
      value: (r) => r.numel,
      text: (r) => r.shape.join(" × "),
      title: "rows × columns; sorts by the number of weights",
    },
    { key: "changed", label: "changed at τ", value: (r) => r.changed, text: (r) => int(r.changed) },
    { key: "sparsity", label: "sparsity at τ", value: sparsity, text: (r) => percent(sparsity(r)) },
    { key: "rank", label: "rank % of full", value: (r) => r.rank_pct, text: (r) => percent(r.rank_pct, 1) },
    {
      key: "relative",
      label: "‖Δ‖/‖W‖",
      value: (r) => r.relative_change,
      text: (r) => (r.relative_change === null ? "–" : sci(r.relative_change)),
    },
  ];
  const geometry: Column<MatrixRow>[] = [
    {
      key: "energy8",
      label: "energy in top-8",
      value: (r) => (r.energy8 === null ? null : 100 * r.energy8),
      text: (r) => percent(r.energy8 === null ? null : 100 * r.energy8, 1),
      title: "share of ‖ΔW‖² inside the base's top-8 singular subspaces",
    },
    {
      key: "rank1",
      label: "rank-1 share",
      value: (r) => (r.rank1 === null ? null : 100 * r.rank1),
      text: (r) => percent(r.rank1 === null ? null : 100 * r.rank1, 1),
      title: "share of ‖ΔW‖² in its largest singular direction",
    },
    {
      key: "enrichment",
      label: "enrichment top 1 % |W₀|",
      value: (r) => r.enrichment,
      text: (r) => (r.enrichment === null ? "–" : r.enrichment.toFixed(2)),
      title: "changed weights among the 1 % largest base weights, over a random mask's",
    },
  ];
  return rows.some((r) => r.energy8 !== null || r.rank1 !== null) ? [...columns, ...geometry] : columns;
}

// `warnings` ({code, message}: a dtype change between base and target, a tied head read from the
// embedding; docs/results.md) is shown as a small notice.
function warningNotice(summary: PairSummary): HTMLElement[] {
  const warnings = summary.warnings ?? [];
  if (!warnings.length) return [];
  return [
    h(
      "div",
      { class: "panel warning", role: "note", id: "warnings" },
      h("strong", {}, "Read with care: "),
      h("ul", {}, ...warnings.map((w) => h("li", { "data-code": w.code }, w.message))),
    ),
  ];
}
