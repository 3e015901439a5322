// Chart builders: pure functions from API data to Plotly {data, layout}. No DOM here, so they
// are unit-tested directly.
import type { Curve, HeatmapCube, TensorDetail } from "./api";
import { count } from "./format";
import type { Metric, Scale } from "./state";

export interface Figure {
  data: any[];
  layout: any;
}

/**
 * A name (checkpoint, analysis, run, tensor, matrix) as literal text in a Plotly string. Plotly
 * renders trace names, titles, tick labels, annotations and hover text as pseudo-HTML (<a href>,
 * <span style>, <b>, <br>, entities), so every piece of data that reaches such a string goes through
 * this: it escapes &, < and >, which Plotly decodes back to the characters when it draws them. Data is
 * never interpolated into a hovertemplate (which would also substitute %{…}); pass it as text.
 */
export const plotlyText = (s: string): string =>
  s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

const METRIC_LABELS: Record<Metric, string> = {
  sparsity: "sparsity (share unchanged)",
  changed_share: "changed share",
  rank_pct: "update rank % of full",
  effective_rank: "effective rank",
  relative_change: "relative change ‖Δ‖/‖W‖",
  mean_abs_delta: "mean |Δ|",
  one_ulp_share: "one-ULP share (moved ≤ 1 ULP)",
};
export const metricLabel = (m: Metric) => METRIC_LABELS[m];

export function formatMetric(metric: Metric, v: number | null): string {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (metric === "sparsity" || metric === "changed_share" || metric === "one_ulp_share")
    return `${(100 * v).toFixed(2)}%`;
  if (metric === "rank_pct") return `${v.toFixed(1)}%`;
  if (metric === "effective_rank") return v.toFixed(1);
  return v.toExponential(2);
}

export const layerLabel = (l: number | null) => (l === null ? "other" : `layer ${l}`);

/** Index of the histogram edge nearest τ in log space (what the τ slider snaps to). */
export function nearestEdge(edges: number[], tau: number): number {
  if (tau <= 0) return -1;
  let best = 0;
  for (let i = 1; i < edges.length; i++) {
    if (
      Math.abs(Math.log10(edges[i]) - Math.log10(tau)) < Math.abs(Math.log10(edges[best]) - Math.log10(tau))
    )
      best = i;
  }
  return best;
}

/** Weights with |Δ| above edge k (k = -1: above exactly 0), from a histogram over the fixed bins. */
export function changedAbove(hist: number[], k: number): number {
  let sum = 0;
  for (let i = k + 2; i < hist.length; i++) sum += hist[i];
  return sum;
}

/** The heatmap grid at edge k from the per-cell histograms: instant, no request. */
export function gridAt(
  cube: Pick<HeatmapCube, "hist" | "numel">,
  k: number,
): { changed: (number | null)[][]; sparsity: (number | null)[][] } {
  const changed = cube.hist.map((row) => row.map((h) => (h ? changedAbove(h, k) : null)));
  const sparsity = changed.map((row, i) =>
    row.map((c, j) => (c === null ? null : 1 - c / (cube.numel[i][j] as number))),
  );
  return { changed, sparsity };
}

export function heatmapFigure(opts: {
  layers: (number | null)[];
  matrices: string[];
  values: (number | null)[][];
  changed?: (number | null)[][];
  numel?: (number | null)[][];
  metric: Metric;
  scale: Scale;
  tauLabel: string;
}): Figure {
  const { layers, matrices, values, metric, scale } = opts;
  const logScale = scale === "log" && !["sparsity", "changed_share", "rank_pct"].includes(metric);
  const z = values.map((row) =>
    row.map((v) => (v === null ? null : logScale ? (v > 0 ? Math.log10(v) : null) : v)),
  );
  const text = values.map((row, i) =>
    row.map((v, j) => {
      const lines = [
        `${plotlyText(layerLabel(layers[i]))} · ${plotlyText(matrices[j])}`,
        `${metricLabel(metric)}: ${formatMetric(metric, v)}`,
      ];
      const c = opts.changed?.[i]?.[j],
        n = opts.numel?.[i]?.[j];
      if (c !== null && c !== undefined && n)
        lines.push(`changed ${count(c)} of ${count(n)} at τ=${opts.tauLabel}`);
      return lines.join("<br>");
    }),
  );
  return {
    data: [
      {
        type: "heatmap",
        z,
        x: matrices.map(plotlyText),
        y: layers.map((l) => plotlyText(layerLabel(l))),
        text,
        hoverinfo: "text",
        hoverongaps: false,
        colorscale: "Viridis",
        reversescale: metric === "sparsity",
        zmin: ["sparsity", "changed_share"].includes(metric) ? undefined : undefined,
        colorbar: {
          title: { text: logScale ? `log10 ${metricLabel(metric)}` : metricLabel(metric), side: "right" },
        },
      },
    ],
    layout: {
      margin: { l: 80, r: 20, t: 10, b: 40 },
      xaxis: { side: "bottom", type: "category" },
      yaxis: { autorange: "reversed", type: "category" },
      height: Math.max(260, 22 * layers.length + 80),
    },
  };
}

/** A dotted vertical line at τ on a log-x chart (none at τ = 0). */
function tauLine(tau: number): object[] {
  const line = { dash: "dot", width: 2, color: "#d62728" };
  return tau > 0 ? [{ type: "line", x0: tau, x1: tau, yref: "paper", y0: 0, y1: 1, line }] : [];
}

export function curveFigure(curve: Curve, tau: number, zeroShare?: number | null): Figure {
  return {
    data: [
      {
        type: "scatter",
        mode: "lines",
        x: curve.tau,
        y: curve.sparsity.map((s) => 100 * s),
        name: "sparsity",
        hovertemplate: "τ=%{x:.2e}<br>sparsity %{y:.2f}%<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 50, r: 10, t: 10, b: 40 },
      height: 260,
      xaxis: { type: "log", title: { text: "τ" }, exponentformat: "e" },
      yaxis: { title: { text: "sparsity %" }, range: [0, 100] },
      shapes: tauLine(tau),
      annotations:
        zeroShare === undefined || zeroShare === null
          ? []
          : [
              {
                xref: "paper",
                yref: "paper",
                x: 0.01,
                y: 0.02,
                showarrow: false,
                text: `${(100 * zeroShare).toFixed(2)}% bit-identical`,
                font: { size: 11 },
              },
            ],
    },
  };
}

export function barsFigure(
  groups: { label: string; changed: number; numel: number }[],
  tauLabel: string,
): Figure {
  return {
    data: [
      {
        type: "bar",
        x: groups.map((g) => plotlyText(g.label)),
        y: groups.map((g) => 100 * (1 - g.changed / g.numel)),
        text: groups.map((g) => `${count(g.changed)} of ${count(g.numel)} changed`),
        hovertemplate: "%{x}: sparsity %{y:.2f}%<br>%{text}<extra></extra>",
        textposition: "none",
      },
    ],
    layout: {
      margin: { l: 50, r: 10, t: 30, b: 40 },
      height: 260,
      title: { text: `τ = ${tauLabel}`, font: { size: 12 } },
      yaxis: { title: { text: "sparsity %" }, range: [0, 100] },
    },
  };
}

export function histogramFigure(hist: number[], edges: number[], tau: number, label: string): Figure {
  // bins: [0], (0,E0], (E0,E1], ... (E_last, inf]; draw the inner ones on a log axis
  const x = edges.slice(1).map((e, i) => Math.sqrt(e * edges[i]));
  const y = hist.slice(2, 2 + x.length);
  return {
    data: [
      {
        type: "bar",
        x,
        y,
        width: edges.slice(1).map((e, i) => e - edges[i]),
        name: plotlyText(label),
        hovertemplate: "%{x:.2e}: %{y:,} weights<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 60, r: 10, t: 30, b: 40 },
      height: 260,
      bargap: 0,
      title: {
        text: `${plotlyText(label)}: ${count(hist[0])} exactly unchanged`,
        font: { size: 12 },
      },
      xaxis: { type: "log", title: { text: plotlyText(label) }, exponentformat: "e" },
      yaxis: { title: { text: "weights" } },
      shapes: tauLine(tau),
    },
  };
}

export function spectrumFigure(t: TensorDetail): Figure {
  const s = t.spectrum!;
  const marks = [
    ["rank", t.rank],
    ["90% energy", t.rank90],
    ["99% energy", t.rank99],
  ] as const;
  return {
    data: [
      {
        type: "scatter",
        mode: "lines",
        x: s.idx.map((i) => i + 1),
        y: s.sigma,
        name: "σ",
        hovertemplate: "σ_%{x}: %{y:.3e}<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 40 },
      height: 260,
      xaxis: { title: { text: "index" } },
      yaxis: { type: "log", title: { text: "singular value of ΔW" }, exponentformat: "e" },
      shapes: marks
        .filter(([, v]) => v)
        .map(([, v], i) => ({
          type: "line",
          x0: v,
          x1: v,
          yref: "paper",
          y0: 0,
          y1: 1,
          line: {
            dash: ["solid", "dash", "dot"][i],
            width: 1.5,
            color: ["#d62728", "#2ca02c", "#9467bd"][i],
          },
        })),
      annotations: marks
        .filter(([, v]) => v)
        .map(([name, v], i) => ({
          x: v,
          yref: "paper",
          y: 1 - 0.08 * i,
          text: `${name} ${v}`,
          showarrow: false,
          xanchor: "left",
          font: { size: 11 },
        })),
    },
  };
}

export function updateMapFigure(map: NonNullable<TensorDetail["update_map"]>): Figure {
  const z: number[][] = [];
  for (let r = 0; r < map.grid_rows; r++)
    z.push(map.cells.slice(r * map.grid_cols, (r + 1) * map.grid_cols).map((v) => 100 * v));
  return {
    data: [
      {
        type: "heatmap",
        z,
        colorscale: "Magma",
        zmin: 0,
        zmax: 100,
        colorbar: { title: { text: "% changed" } },
        hovertemplate: "cell row %{y}, col %{x}: %{z:.1f}% changed<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 50, r: 10, t: 10, b: 40 },
      height: 300,
      yaxis: { autorange: "reversed", title: { text: "rows (out)" } },
      xaxis: { title: { text: "columns (in)" } },
    },
  };
}

export function profileFigure(values: number[], label: string): Figure {
  const name = plotlyText(label);
  return {
    data: [
      {
        type: label === "head" ? "bar" : "scatter",
        mode: "lines",
        x: values.map((_, i) => i),
        y: values.map((v) => 100 * v),
        text: values.map(() => name),
        hovertemplate: "%{text} %{x}: %{y:.1f}% changed<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 50, r: 10, t: 10, b: 40 },
      height: 200,
      yaxis: { title: { text: "% changed" }, range: [0, 100] },
      xaxis: { title: { text: label === "head" ? "attention head" : `${name} (binned)` } },
    },
  };
}

export function seriesFigures(
  steps: { checkpoint: string; changed: number; outside_final: number; transient_fraction: number | null }[],
  numel: number,
): Figure[] {
  const x = steps.map((_, i) => i + 1);
  const names = steps.map((s) => plotlyText(s.checkpoint.split("/").filter(Boolean).pop() ?? s.checkpoint));
  const transient: Figure = {
    data: [
      {
        type: "scatter",
        mode: "lines+markers",
        x,
        y: steps.map((s) => 100 * (s.transient_fraction ?? 0)),
        text: names,
        name: "transient fraction",
        hovertemplate: "%{text}: %{y:.1f}% of moved weights are not in the final mask<extra></extra>",
      },
      {
        type: "scatter",
        mode: "lines+markers",
        x,
        y: steps.map((s) => (100 * s.changed) / numel),
        text: names,
        yaxis: "y2",
        name: "changed vs base",
        hovertemplate: "%{text}: %{y:.2f}% of weights differ from the base<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 60, r: 60, t: 10, b: 40 },
      height: 300,
      xaxis: { title: { text: "checkpoint" }, tickvals: x, ticktext: names },
      yaxis: { title: { text: "transient fraction %" }, range: [0, 100] },
      yaxis2: { title: { text: "changed %" }, overlaying: "y", side: "right", range: [0, 100] },
      legend: { orientation: "h", y: 1.15 },
    },
  };
  // after each checkpoint: moved and kept in the final mask, moved but not in it, not moved (stacked areas)
  const parts = [
    ["moved, in final mask", steps.map((s) => s.changed - s.outside_final)],
    ["moved, not in final mask (transient)", steps.map((s) => s.outside_final)],
    ["not moved", steps.map((s) => numel - s.changed)],
  ] as const;
  const split: Figure = {
    data: parts.map(([name, counts]) => ({
      type: "scatter",
      mode: "lines",
      stackgroup: "one",
      name: plotlyText(name),
      x,
      text: names,
      y: counts.map((c) => (100 * c) / numel),
      hovertemplate: `%{text}: ${plotlyText(name)} %{y:.2f}%<extra></extra>`,
    })),
    layout: {
      margin: { l: 60, r: 10, t: 30, b: 40 },
      height: 300,
      yaxis: { title: { text: "% of weights" }, range: [0, 100] },
      xaxis: { title: { text: "checkpoint" }, tickvals: x, ticktext: names },
      legend: { orientation: "h", y: 1.15 },
    },
  };
  return [transient, split];
}

/** Distance between two circles of areas a, b whose lens has area `both` (bisection). */
export function circleDistance(a: number, b: number, both: number): number {
  const ra = Math.sqrt(a / Math.PI),
    rb = Math.sqrt(b / Math.PI);
  const lens = (d: number) => {
    if (d >= ra + rb) return 0;
    if (d <= Math.abs(ra - rb)) return Math.PI * Math.min(ra, rb) ** 2;
    const x = (d * d + ra * ra - rb * rb) / (2 * d);
    return (
      ra * ra * Math.acos(x / ra) +
      rb * rb * Math.acos((d - x) / rb) -
      d * Math.sqrt(Math.max(0, ra * ra - x * x))
    );
  };
  let lo = Math.abs(ra - rb),
    hi = ra + rb;
  for (let i = 0; i < 60; i++) {
    const mid = (lo + hi) / 2;
    if (lens(mid) > both) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}

/** One pair of runs in an overlap; a share is null when its denominator is 0 (drawn as 0). */
interface OverlapPair {
  a: number;
  b: number;
  both: number;
  o1: number | null;
  o2: number | null;
  baseline1: number | null;
  baseline2: number | null;
}

export function vennFigure(
  labels: string[],
  changed: number[],
  venn: Record<string, number>,
  numel: number,
  pairs: OverlapPair[],
): Figure {
  const n = changed.length;
  const radius = changed.map((c) => Math.sqrt(c / Math.PI));
  const d01 = circleDistance(changed[0], changed[1], pairs[0].both);
  const centers: [number, number][] = [
    [0, 0],
    [d01, 0],
  ];
  if (n === 3) {
    const d02 = circleDistance(changed[0], changed[2], pairs[1].both),
      d12 = circleDistance(changed[1], changed[2], pairs[2].both);
    const x = (d02 * d02 - d12 * d12 + d01 * d01) / (2 * d01);
    centers.push([x, -Math.sqrt(Math.max(0, d02 * d02 - x * x))]);
  }
  const colors = ["#1f77b4", "#ff7f0e", "#2ca02c"];
  const shapes = centers.map(([x, y], i) => ({
    type: "circle",
    xref: "x",
    yref: "y",
    x0: x - radius[i],
    x1: x + radius[i],
    y0: y - radius[i],
    y1: y + radius[i],
    fillcolor: colors[i],
    opacity: 0.35,
    line: { color: colors[i], width: 2 },
  }));
  const annotations = centers.map(([x, y], i) => ({
    x,
    y: y + radius[i] * 1.08,
    text: `<b>${plotlyText(labels[i])}</b><br>${count(changed[i])} changed`,
    showarrow: false,
    font: { size: 12 },
  }));
  const overlapText = pairs.map(
    (p) =>
      `${labels[p.a]} ∧ ${labels[p.b]}: ${count(p.both)} — o1 ${(100 * (p.o1 ?? 0)).toFixed(1)}% (random ${(100 * (p.baseline1 ?? 0)).toFixed(1)}%), o2 ${(100 * (p.o2 ?? 0)).toFixed(1)}% (random ${(100 * (p.baseline2 ?? 0)).toFixed(1)}%)`,
  );
  const xs = centers.map(([x], i) => [x - radius[i], x + radius[i]]).flat(),
    ys = centers.map(([, y], i) => [y - radius[i], y + radius[i]]).flat();
  const span = Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys)) * 0.6;
  const cx = (Math.max(...xs) + Math.min(...xs)) / 2,
    cy = (Math.max(...ys) + Math.min(...ys)) / 2;
  return {
    data: [
      {
        type: "scatter",
        mode: "text",
        x: [cx],
        y: [cy - span * 1.05],
        text: [
          `N = ${count(numel)} weights; regions: ` +
            Object.entries(venn)
              .map(([k, v]) => `${k} ${count(v)}`)
              .join(", "),
        ],
        hoverinfo: "skip",
        textfont: { size: 11 },
      },
    ],
    layout: {
      shapes,
      annotations,
      height: 420,
      margin: { l: 10, r: 10, t: 10, b: 10 },
      showlegend: false,
      xaxis: { visible: false, range: [cx - span * 1.2, cx + span * 1.2] },
      yaxis: { visible: false, range: [cy - span * 1.15, cy + span * 1.15], scaleanchor: "x" },
      meta: { overlapText },
    },
  };
}

export function overlapMatrixFigure(names: string[], pairs: Omit<OverlapPair, "both">[]): Figure {
  const labels = names.map(plotlyText);
  const n = labels.length;
  const z: (number | null)[][] = Array.from({ length: n }, (_, i) =>
    Array.from({ length: n }, (_, j) => (i === j ? 100 : null)),
  );
  const text: string[][] = Array.from({ length: n }, () => Array(n).fill(""));
  for (const p of pairs) {
    z[p.a][p.b] = 100 * (p.o1 ?? 0);
    z[p.b][p.a] = 100 * (p.o2 ?? 0);
    text[p.a][p.b] =
      `|${labels[p.a]}∧${labels[p.b]}| / |${labels[p.a]}| = ${(100 * (p.o1 ?? 0)).toFixed(1)}% (random ${(100 * (p.baseline1 ?? 0)).toFixed(1)}%)`;
    text[p.b][p.a] =
      `|${labels[p.a]}∧${labels[p.b]}| / |${labels[p.b]}| = ${(100 * (p.o2 ?? 0)).toFixed(1)}% (random ${(100 * (p.baseline2 ?? 0)).toFixed(1)}%)`;
  }
  return {
    data: [
      {
        type: "heatmap",
        z,
        x: labels,
        y: labels,
        text,
        hoverinfo: "text",
        colorscale: "Blues",
        zmin: 0,
        zmax: 100,
        colorbar: { title: { text: "overlap %" } },
      },
    ],
    layout: { margin: { l: 80, r: 10, t: 10, b: 60 }, height: 320, yaxis: { autorange: "reversed" } },
  };
}

export function compareFigure(
  analyses: { analysis: string; label: string; layers: { layer: number | null; sparsity: number }[] }[],
): Figure {
  return {
    data: analyses.map((a) => ({
      type: "scatter",
      mode: "lines+markers",
      name: plotlyText(a.label),
      x: a.layers.map((l) => plotlyText(layerLabel(l.layer))),
      y: a.layers.map((l) => 100 * l.sparsity),
      text: a.layers.map(() => plotlyText(a.label)),
      hovertemplate: "%{text}<br>%{x}: sparsity %{y:.2f}%<extra></extra>",
    })),
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 60 },
      height: 360,
      yaxis: { title: { text: "sparsity %" }, range: [0, 100] },
      xaxis: { type: "category" },
      legend: { orientation: "h" },
    },
  };
}
