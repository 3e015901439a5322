// Compare: several pair analyses side by side per layer (e.g. base→SFT vs SFT→RL), at a τ and in a
// metric chosen here (both in the URL), and the layer × matrix difference of the first two.
import {
  get,
  type AnalysisOut,
  type Checkpoint,
  type Comparison,
  type Heatmap,
  type SparsityCurve,
} from "../api";
import { nearestEdge } from "../charts";
import {
  COMPARE_METRIC,
  COMPARE_METRICS,
  type CompareMetric,
  compareLayersFigure,
  differenceFigure,
} from "../comparecharts";
import type { Context } from "../context";
import { h, panel } from "../dom";
import { pct, tauText } from "../format";
import { caption } from "../maskcharts";
import { plotInto } from "../plot";
import { withState } from "../state";

export async function renderCompare(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const metric: CompareMetric = (COMPARE_METRICS as readonly string[]).includes(state.metric)
    ? (state.metric as CompareMetric)
    : "sparsity";
  const [analyses, checkpoints] = await Promise.all([
    get<AnalysisOut[]>("/api/analyses"),
    get<Checkpoint[]>("/api/checkpoints"),
  ]);
  if (!ctx.alive()) return;
  const names = new Map(checkpoints.map((c) => [c.id, c.name]));
  const pairs = analyses.filter((a) => a.kind === "pair" && a.status === "done");
  const label = (a: AnalysisOut) => a.checkpoints.map((c) => names.get(c) ?? c).join(" → ");
  const chips = h(
    "div",
    { class: "chips", role: "group", "aria-label": "analyses to compare" },
    ...pairs.map((a) =>
      h(
        "button",
        {
          type: "button",
          "aria-pressed": String(state.ids.includes(a.id)),
          onclick: () =>
            ctx.navigate(
              withState(state, {
                ids: state.ids.includes(a.id) ? state.ids.filter((x) => x !== a.id) : [...state.ids, a.id],
              }),
            ),
        },
        label(a),
      ),
    ),
  );
  root.replaceChildren(
    h("h1", {}, "Compare analyses"),
    h("p", { class: "muted" }, "Pick pair analyses, e.g. base → SFT and SFT → RL."),
    chips,
  );
  if (!state.ids.length) return;
  const query = `tau=${state.tau}&mode=${state.mode}`;
  const [cmp, curve, heatmaps] = await Promise.all([
    get<Comparison>(`/api/compare?ids=${state.ids.join(",")}&${query}&metric=${metric}`),
    get<SparsityCurve>(`/api/analyses/${state.ids[0]}/sparsity-curve?mode=${state.mode}`),
    Promise.all(
      state.ids
        .slice(0, 2)
        .map((id) => get<Heatmap>(`/api/analyses/${id}/heatmap?metric=${metric}&${query}`)),
    ),
  ]);
  if (!ctx.alive()) return;
  const byId = new Map(pairs.map((a) => [a.id, label(a)]));
  const nameOf = (id: string) => byId.get(id) ?? id;
  const m = COMPARE_METRIC[metric];
  const value = (v: number | null) =>
    v === null ? "–" : m.percent ? `${(m.unit * v).toFixed(2)}%` : v.toExponential(3);
  root.append(
    controls(ctx, metric, curve.tau, cmp.tau),
    h(
      "table",
      { id: "compare-table" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "analysis"),
          h("th", { class: "num" }, `sparsity at τ=${tauText(cmp.tau)}`),
          metric === "sparsity" ? null : h("th", { class: "num" }, m.label),
        ),
      ),
      h(
        "tbody",
        {},
        ...cmp.analyses.map((a) =>
          h(
            "tr",
            {},
            h("td", {}, nameOf(a.analysis)),
            h("td", { class: "num" }, pct(a.sparsity)),
            metric === "sparsity" ? null : h("td", { class: "num" }, value(a.value)),
          ),
        ),
      ),
    ),
  );
  const layers = panel(root, `${m.label} per layer`);
  layers.id = "compare-layers";
  plotInto(
    layers,
    compareLayersFigure(
      cmp.analyses.map((a) => ({ ...a, label: nameOf(a.analysis) })),
      metric,
    ),
    `${m.label} per layer, per analysis`,
  );
  if (heatmaps.length < 2) return;
  const diff = panel(root, `Difference of the first two: ${m.label}, A − B per layer × matrix type`);
  diff.id = "compare-difference";
  plotInto(
    diff,
    differenceFigure(heatmaps[0], heatmaps[1], metric, [nameOf(state.ids[0]), nameOf(state.ids[1])]),
    "difference heatmap of two analyses",
  );
  diff.append(
    caption(
      "Red: A higher, blue: B higher, white: equal; blank where only one of them has that layer or matrix type." +
        (m.percent ? " Percentages differ in percentage points (pp), on a fixed ±100 pp scale." : ""),
    ),
  );
}

/** τ (a histogram edge; moved with the slider, set in the URL on release) and the metric. */
function controls(ctx: Context, metric: CompareMetric, edges: number[], tau: number): HTMLElement {
  const k = nearestEdge(edges, tau);
  const shown = h("output", { id: "compare-tau-value" }, tauText(tau));
  const at = (i: number) => (i < 0 ? 0 : edges[i]);
  const slider = h("input", {
    type: "range",
    min: -1,
    max: edges.length - 1,
    step: 1,
    value: tau === 0 ? -1 : k,
    id: "compare-tau",
    "aria-label": "tolerance τ (histogram edge)",
    oninput: () => (shown.textContent = tauText(at(Number(slider.value)))),
    onchange: () => ctx.navigate(withState(ctx.state, { tau: at(Number(slider.value)) })),
  });
  const select = h(
    "select",
    {
      id: "compare-metric",
      "aria-label": "metric",
      onchange: () => ctx.navigate(withState(ctx.state, { metric: select.value as CompareMetric })),
    },
    ...COMPARE_METRICS.map((x) => h("option", { value: x, selected: x === metric }, COMPARE_METRIC[x].label)),
  );
  return h(
    "div",
    { class: "controls" },
    h("label", {}, "τ", slider, shown),
    h("label", {}, "metric", select),
  );
}
