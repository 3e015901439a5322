// Overview of a pair analysis: key figures, layer × matrix heatmap with a metric selector and a
// τ slider (instant, from the stored histograms), sparsity-vs-τ curve, per-matrix bars, skipped
// tensors.
import {
  get,
  type Checkpoint,
  type Heatmap,
  type HeatmapCube,
  type PairSummary,
  type SparsityCurve,
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
import { METRICS, withState, type Metric, type Mode, type Scale } from "../state";
import { maskExport } from "../mask";
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
  const [summary, cube, curve, heat, checkpoints, rows] = await Promise.all([
    get<PairSummary>(`/api/analyses/${id}/summary`),
    get<HeatmapCube>(`/api/analyses/${id}/heatmap-cube?mode=${state.mode}`),
    get<SparsityCurve>(`/api/analyses/${id}/sparsity-curve?mode=${state.mode}`),
    get<Heatmap>(`/api/analyses/${id}/heatmap?metric=${state.metric}&tau=${state.tau}&mode=${state.mode}`),
    get<Checkpoint[]>("/api/checkpoints"),
    atExact ? get<ExactRow[]>(`/api/analyses/${id}/tensors`) : [],
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
    h("h1", {}, job.checkpoints.map((c) => checkpoints.find((x) => x.id === c)?.name ?? c).join(" → ")),
    h(
      "p",
      { class: "muted" },
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
      if (i >= 0 && j >= 0) openCell(ctx, id, cube.layers[i], cube.matrices[j]);
    },
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
  });
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
type ExactRow = TensorRow & { changed?: { tau: number; count: number }[] };

/** Open the matrix behind a heatmap cell. */
async function openCell(ctx: Context, id: string, layer: number | null, matrix: string): Promise<void> {
  const tensors = await get<TensorRow[]>(`/api/analyses/${id}/tensors`);
  const hit = tensors.find((t) => t.layer === layer && t.matrix === matrix)?.name;
  if (hit) ctx.navigate(withState(ctx.state, { view: "tensor", tensor: hit }));
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
