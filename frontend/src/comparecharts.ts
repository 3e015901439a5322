// Charts of the Compare view: a metric per layer for several pair analyses on one axis (layers in
// numeric order, `other` last, whatever mix of depths), and the layer × matrix difference of two.
import type { Comparison, Heatmap } from "./api";
import { type Figure, layerLabel, plotlyText } from "./charts";
import { layerOrder } from "./maskcharts";

export const COMPARE_METRICS = ["sparsity", "rank_pct", "relative_change"] as const;
export type CompareMetric = (typeof COMPARE_METRICS)[number];

/** How each metric is shown: its name, the factor to its unit, and whether that unit is a percentage
 * (fixed 0–100 % axis, differences in percentage points). */
export const COMPARE_METRIC: Record<CompareMetric, { label: string; unit: number; percent: boolean }> = {
  sparsity: { label: "sparsity % (share unchanged)", unit: 100, percent: true },
  rank_pct: { label: "update rank % of full", unit: 1, percent: true },
  relative_change: { label: "relative change ‖Δ‖/‖W‖", unit: 1, percent: false },
};

type Compared = Comparison["analyses"][number];

/** Blue (negative) – white (0) – red (positive): a diverging scale, centred by zmid = 0. */
export const DIVERGING = [
  [0, "#2166ac"],
  [0.25, "#92c5de"],
  [0.5, "#f7f7f7"],
  [0.75, "#f4a582"],
  [1, "#b2182b"],
];

/** One line per analysis: the metric per layer, on a category axis ordered numerically, `other` last. */
export function compareLayersFigure(
  analyses: (Compared & { label: string })[],
  metric: CompareMetric,
): Figure {
  const m = COMPARE_METRIC[metric];
  const order = layerOrder(analyses.flatMap((a) => a.layers.map((l) => l.layer ?? null))).map(layerLabel);
  return {
    data: analyses.map((a) => ({
      type: "scatter",
      mode: "lines+markers",
      name: plotlyText(a.label),
      x: a.layers.map((l) => layerLabel(l.layer ?? null)),
      y: a.layers.map((l) => (l.value === null ? null : m.unit * l.value)),
      text: a.layers.map(() => plotlyText(a.label)),
      hovertemplate: `%{text}<br>%{x}: ${m.label} = %{y:.3~g}<extra></extra>`,
    })),
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 60 },
      height: 360,
      yaxis: {
        title: { text: m.label },
        ...(m.percent ? { range: [0, 100] } : { rangemode: "tozero" }),
      },
      xaxis: { type: "category", categoryorder: "array", categoryarray: order },
      legend: { orientation: "h" },
    },
  };
}

/** Cells of two heatmaps on the union of their rows and columns: a − b where both have a value. */
export function heatmapDifference(a: Heatmap, b: Heatmap, unit: number) {
  const layers = layerOrder([...a.layers, ...b.layers]);
  const matrices = [...new Set([...a.matrices, ...b.matrices])];
  const at = (m: Heatmap, layer: number | null, matrix: string) =>
    m.values[m.layers.indexOf(layer)]?.[m.matrices.indexOf(matrix)] ?? null;
  const z = layers.map((l) =>
    matrices.map((x) => {
      const [va, vb] = [at(a, l, x), at(b, l, x)];
      return va === null || vb === null ? null : unit * (va - vb);
    }),
  );
  return { layers, matrices, z };
}

/** The difference heatmap: a diverging scale centred at 0 (blue: A lower, red: A higher), fixed at
 * ±100 percentage points for percentages, else symmetric about 0 at the largest |difference|. */
export function differenceFigure(
  a: Heatmap,
  b: Heatmap,
  metric: CompareMetric,
  names: [string, string],
): Figure {
  const m = COMPARE_METRIC[metric];
  const d = heatmapDifference(a, b, m.unit);
  const largest = Math.max(1e-12, ...d.z.flat().map((v) => Math.abs(v ?? 0)));
  const bound = m.percent ? 100 : largest;
  const unit = m.percent ? " (pp)" : "";
  const [na, nb] = names.map(plotlyText);
  return {
    data: [
      {
        type: "heatmap",
        z: d.z,
        x: d.matrices.map(plotlyText),
        y: d.layers.map(layerLabel),
        text: d.z.map((row, i) =>
          row.map((v, j) =>
            v === null
              ? ""
              : `${layerLabel(d.layers[i])} · ${plotlyText(d.matrices[j])}<br>A − B = ${v.toPrecision(3)}${unit}`,
          ),
        ),
        hoverinfo: "text",
        hoverongaps: false,
        colorscale: DIVERGING,
        zmin: -bound,
        zmax: bound,
        zmid: 0,
        colorbar: { title: { text: `A − B${unit} · diverging, 0 = equal`, side: "right" } },
      },
    ],
    layout: {
      margin: { l: 80, r: 20, t: 30, b: 40 },
      title: { text: `A = ${na}, B = ${nb}`, font: { size: 12 } },
      xaxis: { type: "category" },
      yaxis: {
        autorange: "reversed",
        type: "category",
        categoryorder: "array",
        categoryarray: d.layers.map(layerLabel),
      },
      height: Math.max(240, 22 * d.layers.length + 100),
    },
  };
}
