// Overview of an analysis. pair: key figures, layer × matrix heatmap with a metric selector and a
// τ slider (instant, from the stored histograms), sparsity-vs-τ curve, per-matrix bars, skipped
// tensors. series: training curves. overlap: Venn, pairwise matrix, per-layer overlap.
import { get, type AnalysisStatus, type Checkpoint, type Curve, type Heatmap, type HeatmapCube } from "../api";
import {
  barsFigure, changedAbove, compareFigure, curveFigure, gridAt, heatmapFigure, layerLabel, metricLabel,
  nearestEdge, overlapMatrixFigure, seriesFigures, vennFigure,
} from "../charts";
import { h, int, pct, sci } from "../dom";
import type { Context } from "../main";
import { METRICS, withState, type Metric } from "../state";
import { plotInto, replot } from "./plot";

const card = (label: string, value: string, id?: string) =>
  h("div", { class: "card" }, h("div", { class: "value", id }, value), h("div", { class: "label" }, label));

const shortName = (path: string) => path.split("/").filter(Boolean).slice(-2).join("/");

export async function renderOverview(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  root.append(h("div", { class: "loading" }, "Loading…"));
  const status = await get<AnalysisStatus>(`/api/analyses/${state.analysis}`);
  if (!ctx.alive()) return;
  if (status.status !== "done") {
    root.replaceChildren(h("h1", {}, `Analysis ${status.id}`), h("p", {}, h("span", { class: `status ${status.status}` }, status.status), " ",
      h("progress", { max: 1, value: status.progress }), ` ${Math.round(100 * status.progress)}%`),
      status.error ? h("div", { class: "error", role: "alert" }, `${status.error.code}: ${status.error.message}`) : "");
    if (status.status === "queued" || status.status === "running") setTimeout(() => ctx.alive() && ctx.navigate(state, true), 1000);
    return;
  }
  const view = status.kind === "pair" ? "overview" : status.kind;
  if (state.view !== view) return ctx.navigate(withState(state, { view }), true);
  if (status.kind === "series") return renderSeries(ctx);
  if (status.kind === "overlap") return renderOverlap(ctx);
  return renderPair(ctx);
}

async function renderPair(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const id = state.analysis!;
  const [summary, cube, curve, heat, job, checkpoints] = await Promise.all([
    get<any>(`/api/analyses/${id}/summary`), get<HeatmapCube>(`/api/analyses/${id}/heatmap-cube?mode=${state.mode}`),
    get<Curve & { zero_share: number }>(`/api/analyses/${id}/sparsity-curve?mode=${state.mode}`),
    get<Heatmap>(`/api/analyses/${id}/heatmap?metric=${state.metric}&tau=${state.tau}&mode=${state.mode}`),
    get<AnalysisStatus>(`/api/analyses/${id}`), get<Checkpoint[]>("/api/checkpoints"),
  ]);
  if (!ctx.alive()) return;
  const edges = cube.bin_edges;
  let k = nearestEdge(edges, state.tau);
  const s = summary.summary;

  const tauLabel = h("output", { id: "tau-value" });
  const slider = h("input", { type: "range", min: -1, max: edges.length - 1, step: 1, value: k, id: "tau-slider",
                              "aria-label": "tolerance τ (histogram edge)" }) as HTMLInputElement;
  const metric = h("select", { id: "metric", "aria-label": "metric" },
    ...METRICS.map((m) => h("option", { value: m, selected: m === state.metric }, metricLabel(m)))) as HTMLSelectElement;
  const mode = h("select", { id: "mode", "aria-label": "mode" }, h("option", { value: "abs", selected: state.mode === "abs" }, "absolute |Δ| > τ"),
    h("option", { value: "rel", selected: state.mode === "rel" }, "relative |Δ| > τ·|W|")) as HTMLSelectElement;
  const scale = h("select", { id: "scale", "aria-label": "colour scale" }, h("option", { value: "linear", selected: state.scale === "linear" }, "linear"),
    h("option", { value: "log", selected: state.scale === "log" }, "log")) as HTMLSelectElement;
  const sparsityCard = h("div", { class: "value", id: "global-sparsity" });
  const changedCard = h("div", { class: "value", id: "global-changed" });

  const tauAt = (index: number) => (index < 0 ? 0 : edges[index]);
  const heatFigure = () => {
    const usesTau = state.metric === "sparsity" || state.metric === "changed_share";
    const grid = gridAt(cube, k);
    const values = usesTau ? grid.sparsity.map((row) => row.map((v) => (v === null ? null : state.metric === "sparsity" ? v : 1 - v)))
                           : heat.values;
    return heatmapFigure({ layers: cube.layers, matrices: cube.matrices, values, changed: grid.changed, numel: cube.numel,
                           metric: state.metric, scale: state.scale, tauLabel: sci(tauAt(k)) });
  };
  const totals = () => {
    let changed = 0, numel = 0;
    cube.hist.forEach((row, i) => row.forEach((hist, j) => { if (hist) { changed += changedAbove(hist, k); numel += cube.numel[i][j] as number; } }));
    return { changed, numel };
  };
  const bars = () => barsFigure(cube.matrices.map((m, j) => {
    let changed = 0, numel = 0;
    cube.hist.forEach((row, i) => { if (row[j]) { changed += changedAbove(row[j]!, k); numel += cube.numel[i][j] as number; } });
    return { label: m, changed, numel };
  }), sci(tauAt(k)));

  root.replaceChildren(
    h("h1", {}, job.checkpoints.map((c) => checkpoints.find((x) => x.id === c)?.name ?? c).join(" → ")),
    h("p", { class: "muted" }, `pair analysis ${id} · ${summary.family} family · ${int(s.numel)} parameters compared · `,
      h("a", { href: `/compare?ids=${id}`, "data-link": true }, "compare with other analyses")),
    h("div", { class: "cards" },
      h("div", { class: "card" }, sparsityCard, h("div", { class: "label" }, "sparsity at τ (share of weights unchanged)")),
      h("div", { class: "card" }, changedCard, h("div", { class: "label" }, "weights changed at τ")),
      card("parameters compared", int(s.numel)),
      card("mean update rank (% of full)", s.mean_rank_pct === null ? "–" : `${s.mean_rank_pct.toFixed(1)}%`),
      card("min update rank", s.min_rank_pct === null ? "–" : `${s.min_rank_pct.toFixed(1)}%`),
      card("relative change ‖Δ‖/‖W‖", s.similarity.relative_l2 === null ? "–" : sci(s.similarity.relative_l2))),
    h("div", { class: "controls" }, h("label", {}, "metric ", metric), h("label", {}, "τ ", slider, tauLabel),
      h("label", {}, "mode ", mode), h("label", {}, "colour ", scale)),
  );
  const heatPanel = h("section", { class: "panel" }, h("h2", {}, "Layer × matrix type — click a cell for that matrix"));
  root.append(heatPanel);
  const heatEl = plotInto(heatPanel, heatFigure(), "heatmap of the metric by layer and matrix type", (point) => {
    const layer = cube.layers[cube.layers.map(layerLabel).indexOf(point.y)];
    const matrix = point.x as string;
    const tensor = summary.tensors_by_cell?.[`${layer}|${matrix}`];
    openCell(ctx, id, layer, matrix, tensor);
  });
  heatEl.id = "heatmap";
  const row = h("div", { class: "grid2" });
  const curvePanel = h("section", { class: "panel" }, h("h2", {}, "Sparsity vs τ"));
  const barsPanel = h("section", { class: "panel" }, h("h2", {}, "By matrix type"));
  row.append(curvePanel, barsPanel);
  root.append(row);
  const curveEl = plotInto(curvePanel, curveFigure(curve, tauAt(k), curve.zero_share), "sparsity as a function of tau");
  const barsEl = plotInto(barsPanel, bars(), "sparsity by matrix type");
  const skipped = Object.entries(summary.skipped as Record<string, any[]>).filter(([, v]) => v.length);
  root.append(h("section", { class: "panel" }, h("h2", {}, "Skipped tensors"),
    skipped.length ? h("ul", {}, ...skipped.map(([reason, names]) => h("li", {}, `${reason.replace("_", " ")}: `,
      names.map((n: any) => (typeof n === "string" ? n : `${n.name}${n.shapes ? ` ${JSON.stringify(n.shapes)}` : ""}`)).join(", "))))
                   : h("p", { class: "muted" }, "None: every tensor was compared.")));

  const update = () => {
    const { changed, numel } = totals();
    tauLabel.textContent = k < 0 ? "0 (any change)" : sci(edges[k]);
    sparsityCard.textContent = pct(1 - changed / numel);
    changedCard.textContent = int(changed);
  };
  update();
  slider.addEventListener("input", () => {
    k = Number(slider.value);
    update();
    replot(heatEl, heatFigure());
    replot(barsEl, bars());
    replot(curveEl, curveFigure(curve, tauAt(k), curve.zero_share));
  });
  slider.addEventListener("change", () => { state.tau = tauAt(k); ctx.remember(state); });
  metric.addEventListener("change", () => ctx.navigate(withState(state, { metric: metric.value as Metric, tau: tauAt(k) })));
  mode.addEventListener("change", () => ctx.navigate(withState(state, { mode: mode.value as "abs" | "rel", tau: tauAt(k) })));
  scale.addEventListener("change", () => ctx.navigate(withState(state, { scale: scale.value as "linear" | "log", tau: tauAt(k) })));
}

async function openCell(ctx: Context, id: string, layer: number | null, matrix: string, known?: string): Promise<void> {
  const tensors = await get<{ name: string; layer: number | null; matrix: string }[]>(`/api/analyses/${id}/tensors`);
  const hit = known ?? tensors.find((t) => t.layer === layer && t.matrix === matrix)?.name;
  if (hit) ctx.navigate(withState(ctx.state, { view: "tensor", tensor: hit }));
}

async function renderSeries(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const series = await get<any>(`/api/analyses/${state.analysis}/series`);
  if (!ctx.alive()) return;
  const [curves, split] = seriesFigures(series.steps, series.numel);
  const c = series.categories;
  root.replaceChildren(h("h1", {}, `Training series · ${series.steps.length} checkpoints`),
    h("p", { class: "muted" }, `τ = ${sci(series.tau)} · masks M_t = changed(θ_t vs base); transient = moved at some step but not in the final mask`),
    h("div", { class: "cards" }, card("consistent (in the final mask)", pct(c.consistent / series.numel), "consistent"),
      card("transient (moved, then reverted)", pct(c.transient / series.numel), "transient"),
      card("never moved", pct(c.untouched / series.numel), "untouched")));
  const row = h("div", { class: "grid2" });
  const a = h("section", { class: "panel" }, h("h2", {}, "Transient fraction over training"));
  const b = h("section", { class: "panel" }, h("h2", {}, "What each checkpoint moved, against the final mask"));
  row.append(a, b);
  root.append(row);
  plotInto(a, curves, "transient fraction per checkpoint");
  plotInto(b, split, "share of weights per category");
  const layers = new Map<string, { numel: number; consistent: number; transient: number }>();
  for (const t of (await get<any>(`/api/analyses/${state.analysis}/result`)).tensors) {
    const key = layerLabel(t.layer);
    const l = layers.get(key) ?? { numel: 0, consistent: 0, transient: 0 };
    l.numel += t.numel; l.consistent += t.categories.consistent; l.transient += t.categories.transient;
    layers.set(key, l);
  }
  const details = h("details", {}, h("summary", {}, "Per-layer split"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "layer"), h("th", { class: "num" }, "consistent"), h("th", { class: "num" }, "transient"))),
      h("tbody", {}, ...[...layers].map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, pct(v.consistent / v.numel)),
        h("td", { class: "num" }, pct(v.transient / v.numel)))))));
  root.append(h("section", { class: "panel" }, details));
}

async function renderOverlap(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const o = await get<any>(`/api/analyses/${state.analysis}/overlap`);
  if (!ctx.alive()) return;
  const labels = o.runs.map((r: string, i: number) => `${String.fromCharCode(65 + i)}: ${shortName(r)}`);
  const short = o.runs.map((_: string, i: number) => String.fromCharCode(65 + i));
  const s = o.summary;
  root.replaceChildren(h("h1", {}, `Overlap of ${o.runs.length} runs`),
    h("p", { class: "muted" }, `τ = ${sci(o.tau)} · ${labels.join(" · ")}`),
    h("table", { id: "overlap-pairs" }, h("thead", {}, h("tr", {}, ...["pair", "both", "o1", "random", "o2", "random", "Jaccard"].map((x) => h("th", {}, x)))),
      h("tbody", {}, ...s.pairs.map((p: any) => h("tr", {}, h("td", {}, `${short[p.a]} ∧ ${short[p.b]}`), h("td", { class: "num" }, int(p.both)),
        h("td", { class: "num" }, pct(p.o1, 1)), h("td", { class: "num muted" }, pct(p.baseline1, 1)),
        h("td", { class: "num" }, pct(p.o2, 1)), h("td", { class: "num muted" }, pct(p.baseline2, 1)), h("td", { class: "num" }, pct(p.jaccard, 1)))))));
  const row = h("div", { class: "grid2" });
  root.append(row);
  if (s.venn) {
    const venn = h("section", { class: "panel" }, h("h2", {}, "Venn (areas proportional to counts)"));
    row.append(venn);
    plotInto(venn, vennFigure(short, s.changed, s.venn, s.numel, s.pairs), "Venn diagram of update masks");
  }
  const matrix = h("section", { class: "panel" }, h("h2", {}, "Pairwise overlap (row run's share)"));
  row.append(matrix);
  plotInto(matrix, overlapMatrixFigure(short, s.pairs), "pairwise overlap matrix");
  const layerPanel = h("section", { class: "panel" }, h("h2", {}, "Per layer: o1 of each pair vs its random baseline"));
  root.append(layerPanel);
  const pairs = s.pairs.map((p: any) => `${short[p.a]}∧${short[p.b]}`);
  plotInto(layerPanel, compareFigure(s.pairs.map((p: any, i: number) => ({
    analysis: pairs[i], label: `${pairs[i]} overlap o1`,
    layers: o.layers.map((l: any) => ({ layer: l.layer, sparsity: l.changed[p.a] ? l.both[i] / l.changed[p.a] : 0 })) }))
    .concat(s.pairs.map((p: any, i: number) => ({ analysis: `${pairs[i]}-random`, label: `${pairs[i]} random baseline`,
      layers: o.layers.map((l: any) => ({ layer: l.layer, sparsity: l.changed[p.b] / l.numel })) })))), "per-layer overlap");
}
