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

/** How a figure's values are coloured and named. Shares are fixed to 0–100 % so one colour means one
 * value across analyses and τ; magnitudes without a natural bound take the data's range (log allowed). */
export interface ColourScale {
  label: string;
  unit: string; // "" when the value is its own unit (a ratio, |Δ|)
  factor: number; // value from the API × factor = value shown (shares in %)
  range?: [number, number]; // fixed colour range, in shown units
  kind: "sequential" | "diverging";
  mid?: number; // diverging: the neutral value
  colorscale: string;
  reverse?: boolean;
  digits?: number; // fixed digits; none: scientific notation
}

const SHARE = { factor: 100, range: [0, 100] as [number, number], kind: "sequential" as const };
export const COLOUR_SCALES = {
  sparsity: {
    label: "unchanged",
    unit: "% of weights",
    ...SHARE,
    colorscale: "Viridis",
    reverse: true,
    digits: 2,
  },
  changed_share: { label: "changed", unit: "% of weights", ...SHARE, colorscale: "Viridis", digits: 2 },
  rank_pct: {
    label: "update rank",
    unit: "% of full",
    ...SHARE,
    factor: 1,
    colorscale: "Cividis",
    digits: 1,
  },
  effective_rank: { label: "effective rank", unit: "% of full", ...SHARE, colorscale: "Cividis", digits: 1 },
  relative_change: {
    label: "relative change ‖Δ‖/‖W‖",
    unit: "",
    factor: 1,
    kind: "sequential",
    colorscale: "YlGnBu",
    reverse: true,
  },
  mean_abs_delta: {
    label: "mean |Δ|",
    unit: "",
    factor: 1,
    kind: "sequential",
    colorscale: "YlOrRd",
    reverse: true,
  },
  one_ulp_share: { label: "moved ≤ 1 ULP", unit: "% of weights", ...SHARE, colorscale: "Viridis", digits: 2 },
  update_map: {
    label: "changed",
    unit: "% of the cell's weights",
    ...SHARE,
    colorscale: "YlOrRd",
    reverse: true,
    digits: 1,
  },
  energy_share: { label: "energy in top-8", unit: "% of ‖ΔW‖²", ...SHARE, colorscale: "Viridis", digits: 1 },
  rank1_dominance: { label: "rank-1 share σ₁²/‖ΔW‖²", unit: "%", ...SHARE, colorscale: "Viridis", digits: 1 },
  enrichment: {
    label: "enrichment",
    unit: "observed / expected",
    factor: 1,
    kind: "diverging",
    mid: 1,
    colorscale: "RdBu",
    reverse: true, // above 1 (more than chance) blue, below red
    digits: 2,
  },
} satisfies Record<Metric | string, ColourScale>;

/** "changed<br>% of weights (sequential)": what a colour bar is titled (two lines: it fits short bars). */
export function scaleTitle(s: ColourScale, log = false): string {
  return `${log ? "log10 " : ""}${s.label}<br>${s.unit ? `${s.unit} ` : ""}(${s.kind})`;
}

/** A value (API units) as text in the scale's unit: "12.35%", "99.5%", "1.23e-3". */
export function formatScaled(s: ColourScale, v: number | null | undefined): string {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const shown = v * s.factor;
  const text = s.digits === undefined ? shown.toExponential(2) : shown.toFixed(s.digits);
  return s.unit.startsWith("%") ? `${text}%` : text;
}

/** The colour settings of a heatmap trace for a scale; `log`: only for scales without a fixed range. */
export function colourAxis(s: ColourScale, log: boolean): object {
  return {
    colorscale: s.colorscale,
    reversescale: Boolean(s.reverse),
    ...(s.range && !log ? { zmin: s.range[0], zmax: s.range[1] } : {}),
    ...(s.mid !== undefined ? { zmid: s.mid } : {}),
    colorbar: { title: { text: scaleTitle(s, log), side: "right" } },
  };
}

/** Grids this small show each cell's value inside it. */
const CELL_TEXT_MAX = { cells: 400, rows: 40 };
export const cellTextFits = (rows: number, cols: number) =>
  rows <= CELL_TEXT_MAX.rows && rows * cols <= CELL_TEXT_MAX.cells;

const METRIC_LABELS: Record<Metric, string> = {
  sparsity: "sparsity (share unchanged)",
  changed_share: "changed share",
  rank_pct: "update rank % of full",
  effective_rank: "effective rank % of full",
  relative_change: "relative change ‖Δ‖/‖W‖",
  mean_abs_delta: "mean |Δ|",
  one_ulp_share: "one-ULP share (moved ≤ 1 ULP)",
};
export const metricLabel = (m: Metric) => METRIC_LABELS[m];

export const formatMetric = (metric: Metric, v: number | null): string =>
  formatScaled(COLOUR_SCALES[metric], v);

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
  values: (number | null)[][]; // API units: shares 0–1 (effective rank: a share of full rank)
  changed?: (number | null)[][];
  numel?: (number | null)[][];
  metric: Metric;
  scale: Scale;
  tauLabel: string;
}): Figure {
  const { layers, matrices, values, metric } = opts;
  const s: ColourScale = COLOUR_SCALES[metric];
  const log = opts.scale === "log" && !s.range;
  const shown = values.map((row) => row.map((v) => (v === null ? null : v * s.factor)));
  const z = shown.map((row) => row.map((v) => (v === null || !log ? v : v > 0 ? Math.log10(v) : null)));
  const hovertext = values.map((row, i) =>
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
  const withText = cellTextFits(layers.length, matrices.length);
  return {
    data: [
      {
        type: "heatmap",
        z,
        customdata: shown, // the values in the colour bar's unit, never log: what CSV exports
        x: matrices.map(plotlyText),
        y: layers.map((l) => plotlyText(layerLabel(l))),
        hovertext,
        hoverinfo: "text",
        hoverongaps: false,
        ...(withText
          ? {
              text: values.map((row) => row.map((v) => (v === null ? "" : formatMetric(metric, v)))),
              texttemplate: "%{text}",
              textfont: { size: 10 },
            }
          : {}),
        ...colourAxis(s, log),
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

/** Boundaries splitting `length` items into `bins` consecutive groups: the worker's binning of update
 * maps and profiles (worker/metrics.py bin_bounds), so cells map back to real row / column indices. */
export const binBounds = (length: number, bins: number): number[] =>
  Array.from({ length: bins + 1 }, (_, i) => Math.floor((i * length) / bins));

/** "12–15" (inclusive) or "12" for the items of one bin. */
const span = (bounds: number[], i: number) =>
  bounds[i + 1] - bounds[i] > 1 ? `${bounds[i]}–${bounds[i + 1] - 1}` : `${bounds[i]}`;

export function updateMapFigure(map: NonNullable<TensorDetail["update_map"]>, shape: number[]): Figure {
  const [rows, cols] = shape;
  const rowBounds = binBounds(rows, map.grid_rows),
    colBounds = binBounds(cols, map.grid_cols);
  const s = COLOUR_SCALES.update_map;
  const z: number[][] = [];
  for (let r = 0; r < map.grid_rows; r++)
    z.push(map.cells.slice(r * map.grid_cols, (r + 1) * map.grid_cols).map((v) => v * s.factor));
  const hovertext = z.map((row, r) =>
    row.map((v, c) => `rows ${span(rowBounds, r)}, columns ${span(colBounds, c)}: ${v.toFixed(1)}% changed`),
  );
  const withText = cellTextFits(map.grid_rows, map.grid_cols);
  return {
    data: [
      {
        type: "heatmap",
        z,
        // cell edges in real indices: the axes read as the matrix's rows and columns
        x: colBounds,
        y: rowBounds,
        hovertext,
        hoverinfo: "text",
        ...(withText ? { texttemplate: "%{z:.0f}", textfont: { size: 9 } } : {}),
        ...colourAxis(s, false),
        meta: {
          csv: {
            rows: rowBounds.slice(0, -1).map((_, r) => `rows ${span(rowBounds, r)}`),
            cols: colBounds.slice(0, -1).map((_, c) => `columns ${span(colBounds, c)}`),
          },
        },
      },
    ],
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 40 },
      height: 320,
      yaxis: { autorange: "reversed", title: { text: `row (output feature, 0–${rows - 1})` } },
      xaxis: { title: { text: `column (input feature, 0–${cols - 1})` } },
    },
  };
}

/** A profile's share changed per row, column (binned: x is each bin's first index) or head. */
export function profileFigure(values: number[], label: string, length = values.length): Figure {
  const name = plotlyText(label);
  const head = label === "head";
  const x = binBounds(length, values.length).slice(0, -1);
  return {
    data: [
      {
        type: head ? "bar" : "scatter",
        mode: "lines",
        x,
        y: values.map((v) => 100 * v),
        text: values.map(() => name),
        textposition: "none",
        hovertemplate: `%{text} %{x}${values.length < length ? "…" : ""}: %{y:.1f}% changed<extra></extra>`,
      },
    ],
    layout: {
      margin: { l: 50, r: 10, t: 10, b: 40 },
      height: 200,
      yaxis: { title: { text: "% changed" }, range: [0, 100] },
      xaxis: head
        ? { title: { text: "attention head" }, dtick: 1, tickformat: "d" }
        : { title: { text: values.length < length ? `${name} (binned)` : name }, tickformat: "d" },
    },
  };
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
