// Charts of update masks across runs / checkpoints (issue 13, items 4–5): the UpSet chart of an
// overlap, and a series' first-change bars, transient-share heatmap and ‖Δ‖ per step. Pure
// functions from API data to Plotly figures, like charts.ts.
import type { Overlap, Series, SeriesResult } from "./api";
import { type Figure, layerLabel, plotlyText } from "./charts";
import { h } from "./dom";
import { count, pct } from "./format";

type UpsetRow = NonNullable<Overlap["summary"]["upset"]>[number];
const fmt = count;

/** The one-sentence caption under a chart: what it measures. */
export const caption = (text: string) => h("p", { class: "caption muted" }, text);

/** Shown intersections: non-empty ones, largest first, at most `limit`. */
export function upsetColumns(rows: UpsetRow[], limit = 40): UpsetRow[] {
  return rows
    .filter((r) => r.exact > 0)
    .sort((a, b) => b.exact - a.exact || a.runs.length - b.runs.length)
    .slice(0, limit);
}

/**
 * UpSet chart: one bar per intersection (weights changed in exactly those runs), and below it a dot
 * matrix whose filled dots name the runs of each bar; hover gives the exact and inclusive counts.
 */
export function upsetFigure(runs: string[], rows: UpsetRow[]): Figure {
  const cols = upsetColumns(rows);
  const x = cols.map((_, i) => i);
  const names = runs.map(plotlyText);
  const label = (r: UpsetRow) => r.runs.map((k) => names[k]).join(" ∧ ");
  const dots = (member: boolean) => {
    const pts = cols.flatMap((c, i) =>
      runs.map((_, k) => ({ i, k, on: c.runs.includes(k) })).filter((p) => p.on === member),
    );
    return {
      type: "scatter",
      mode: "markers",
      x: pts.map((p) => p.i),
      y: pts.map((p) => p.k),
      yaxis: "y2",
      marker: { size: 11, color: member ? "#1f4e79" : "rgba(150,150,150,0.3)" },
      hoverinfo: "skip",
      showlegend: false,
    };
  };
  const links = cols.map((c, i) => ({
    type: "scatter",
    mode: "lines",
    x: c.runs.map(() => i),
    y: c.runs,
    yaxis: "y2",
    line: { color: "#1f4e79", width: 3 },
    hoverinfo: "skip",
    showlegend: false,
  }));
  return {
    data: [
      {
        type: "bar",
        x,
        y: cols.map((c) => c.exact),
        text: cols.map(
          (c) =>
            `${label(c)}<br>exactly these runs: ${fmt(c.exact)}<br>at least these runs: ${fmt(c.inclusive)}`,
        ),
        hoverinfo: "text",
        textposition: "none",
        marker: { color: "#1f4e79" },
        showlegend: false,
      },
      ...links,
      dots(false),
      dots(true),
    ],
    layout: {
      margin: { l: 110, r: 10, t: 10, b: 10 },
      height: 260 + 22 * runs.length,
      xaxis: { showticklabels: false, range: [-0.6, cols.length - 0.4], zeroline: false },
      yaxis: { domain: [0.4, 1], title: { text: "weights (exact)" } },
      yaxis2: {
        domain: [0, 0.35],
        tickvals: runs.map((_, k) => k),
        ticktext: names,
        range: [runs.length - 0.5, -0.5],
        zeroline: false,
        showgrid: false,
      },
      bargap: 0.3,
    },
  };
}

type Step = Series["steps"][number];
const shortName = (s: string) => plotlyText(s.split("/").filter(Boolean).pop() ?? s);

/** Per checkpoint: weights that first differ from the base there, stacked kept / reverted. */
export function firstChangeFigure(steps: Step[]): Figure {
  const { x, xaxis } = stepAxis(steps.map((s) => s.checkpoint));
  const names = steps.map((s) => shortName(s.checkpoint));
  const part = (key: "kept" | "reverted", name: string, color: string) => ({
    type: "bar",
    name,
    x,
    y: steps.map((s) => s[key] ?? 0),
    text: steps.map((s, i) => `${names[i]}: ${fmt(s[key] ?? 0)} of ${fmt(s.first_changed ?? 0)}`),
    hovertemplate: `%{text} first changed here are ${name}<extra></extra>`,
    textposition: "none",
    marker: { color },
  });
  return {
    data: [
      part("kept", "kept (changed at the final checkpoint)", "#2a9d8f"),
      part("reverted", "reverted (back within τ at the end)", "#e76f51"),
    ],
    layout: {
      barmode: "stack",
      margin: { l: 70, r: 10, t: 30, b: 40 },
      height: 300,
      xaxis,
      yaxis: { title: { text: "weights first changed" } },
      legend: { orientation: "h", y: 1.15 },
    },
  };
}

/** ‖θ_t − θ₀‖₂ per checkpoint (absolute); the relative one, ‖θ_t − θ₀‖₂ / ‖θ₀‖₂, in the hover. */
export function normFigure(steps: Step[]): Figure {
  const { x, xaxis } = stepAxis(steps.map((s) => s.checkpoint));
  const names = steps.map((s) => shortName(s.checkpoint));
  return {
    data: [
      {
        type: "scatter",
        mode: "lines+markers",
        x,
        y: steps.map((s) => s.norm_delta ?? null),
        text: steps.map(
          (s, i) =>
            `${names[i]}: ‖Δ‖₂ = ${(s.norm_delta ?? 0).toExponential(4)}, relative ${(s.relative_l2 ?? 0).toExponential(3)}`,
        ),
        hoverinfo: "text",
      },
    ],
    layout: {
      margin: { l: 70, r: 10, t: 30, b: 40 },
      height: 300,
      xaxis,
      yaxis: { title: { text: "‖θ_t − θ₀‖₂" }, rangemode: "tozero" },
    },
  };
}

/** Layer × matrix type: the share of weights that moved at some step but not in the final mask. */
export function transientHeatmapFigure(t: Series["transient_heatmap"]): Figure {
  const text = t.share.map((row, i) =>
    row.map((v, j) =>
      v === null
        ? ""
        : `${plotlyText(layerLabel(t.layers[i]))} · ${plotlyText(t.matrices[j])}<br>transient ${(100 * v).toFixed(2)}%` +
          `<br>${fmt(t.transient[i][j] ?? 0)} of ${fmt(t.numel[i][j] ?? 0)} weights`,
    ),
  );
  return {
    data: [
      {
        type: "heatmap",
        z: t.share.map((row) => row.map((v) => (v === null ? null : 100 * v))),
        x: t.matrices.map(plotlyText),
        y: t.layers.map((l) => plotlyText(layerLabel(l))),
        text,
        hoverinfo: "text",
        hoverongaps: false,
        ...PERCENT_SCALE,
        colorbar: { title: { text: "transient % · sequential 0–100", side: "right" } },
      },
    ],
    layout: {
      margin: { l: 80, r: 20, t: 10, b: 40 },
      xaxis: { type: "category" },
      yaxis: { autorange: "reversed", type: "category" },
      height: Math.max(240, 22 * t.layers.length + 80),
    },
  };
}

/** Every percentage heatmap: one sequential scale, fixed 0–100 % whatever the analysis or τ. */
export const PERCENT_SCALE = { colorscale: "Viridis", zmin: 0, zmax: 100 };

/** Line colours of pairs / layers, in order (a pair's baseline is drawn in its pair's colour, dashed). */
export const LINE_COLORS = [
  "#1f77b4",
  "#ff7f0e",
  "#2ca02c",
  "#d62728",
  "#9467bd",
  "#8c564b",
  "#e377c2",
  "#7f7f7f",
  "#bcbd22",
  "#17becf",
];

/** The training step a checkpoint's name carries (checkpoint-500, step_1000, global_step20, …), or
 * null: the last path component that names one wins. */
export function stepNumber(path: string): number | null {
  const STEP = /(?:global[_-]?step|checkpoint|ckpt|step|iter(?:ation)?|epoch)[-_]?(\d+)$/i;
  for (const part of path.split("/").filter(Boolean).reverse()) {
    const m = STEP.exec(part.replace(/\.(safetensors|bin|pt|pth)$/i, ""));
    if (m) return Number(m[1]);
  }
  return null;
}

/** The x axis of a series: real step numbers when every checkpoint names a distinct, increasing one,
 * else checkpoint 1 … T; every checkpoint gets a tick, labelled with its name. */
export function stepAxis(checkpoints: string[]): { x: number[]; xaxis: object; steps: boolean } {
  const numbers = checkpoints.map(stepNumber);
  const steps = numbers.every((n, i) => n !== null && (i === 0 || n > (numbers[i - 1] as number)));
  const x = steps ? (numbers as number[]) : checkpoints.map((_, i) => i + 1);
  const names = checkpoints.map(shortName);
  return {
    x,
    steps,
    xaxis: {
      title: { text: steps ? "training step" : "checkpoint" },
      tickvals: x,
      ticktext: steps ? x.map(String) : names,
      tickangle: x.length > 8 ? -45 : 0,
    },
  };
}

/** Per checkpoint, the share of the weights it moved that are not in the final mask (own 0–100 % axis). */
export function transientFigure(steps: Step[]): Figure {
  const { x, xaxis } = stepAxis(steps.map((s) => s.checkpoint));
  return {
    data: [
      {
        type: "scatter",
        mode: "lines+markers",
        x,
        y: steps.map((s) => (s.transient_fraction === null ? null : 100 * s.transient_fraction)),
        text: steps.map((s) => shortName(s.checkpoint)),
        name: "transient fraction",
        hovertemplate: "%{text}: %{y:.1f}% of moved weights are not in the final mask<extra></extra>",
      },
    ],
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 60 },
      height: 300,
      xaxis,
      yaxis: { title: { text: "transient fraction %" }, range: [0, 100] },
    },
  };
}

/** Per checkpoint, all weights split: moved and in the final mask, moved but not, not moved (stacked). */
export function splitFigure(steps: Step[], numel: number): Figure {
  const { x, xaxis } = stepAxis(steps.map((s) => s.checkpoint));
  const parts = [
    ["moved, in final mask", steps.map((s) => s.changed - s.outside_final)],
    ["moved, not in final mask (transient)", steps.map((s) => s.outside_final)],
    ["not moved", steps.map((s) => numel - s.changed)],
  ] as const;
  return {
    data: parts.map(([name, counts]) => ({
      type: "scatter",
      mode: "lines",
      stackgroup: "one",
      name,
      x,
      text: steps.map((s) => shortName(s.checkpoint)),
      y: counts.map((c) => (100 * c) / numel),
      hovertemplate: `%{text}: ${name} %{y:.2f}%<extra></extra>`,
    })),
    layout: {
      margin: { l: 60, r: 10, t: 30, b: 60 },
      height: 300,
      xaxis,
      yaxis: { title: { text: "% of weights" }, range: [0, 100] },
      legend: { orientation: "h", y: 1.15 },
    },
  };
}

type SeriesTensor = SeriesResult["tensors"][number];

/** Per layer and checkpoint: Σ changed and Σ outside the final mask of the layer's tensors. */
export function layerSteps(
  tensors: SeriesTensor[],
): { layer: number | null; changed: number[]; outside: number[] }[] {
  const layers = new Map<number | null, { changed: number[]; outside: number[] }>();
  for (const t of tensors) {
    const layer = t.layer ?? null;
    const l = layers.get(layer) ?? { changed: t.steps.map(() => 0), outside: t.steps.map(() => 0) };
    t.steps.forEach((s, i) => {
      l.changed[i] += s.changed;
      l.outside[i] += s.outside_final;
    });
    layers.set(layer, l);
  }
  return layerOrder([...layers.keys()]).map((layer) => ({ layer, ...layers.get(layer)! }));
}

/** One line per layer: its transient fraction at each checkpoint. */
export function layerTransientFigure(checkpoints: string[], tensors: SeriesTensor[]): Figure {
  const { x, xaxis } = stepAxis(checkpoints);
  return {
    data: layerSteps(tensors).map((l, i) => ({
      type: "scatter",
      mode: "lines+markers",
      name: layerLabel(l.layer),
      x,
      y: l.changed.map((c, k) => (c ? (100 * l.outside[k]) / c : null)),
      line: { color: LINE_COLORS[i % LINE_COLORS.length] },
      hovertemplate: `${layerLabel(l.layer)} · %{x}: %{y:.1f}% of its moved weights transient<extra></extra>`,
    })),
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 60 },
      height: 320,
      xaxis,
      yaxis: { title: { text: "transient fraction %" }, range: [0, 100] },
      legend: { orientation: "h", y: -0.3 },
    },
  };
}

/** Layers in numeric order, `other` (null: embeddings, head, norms outside a layer) last. */
export function layerOrder(layers: (number | null)[]): (number | null)[] {
  return [...new Set(layers)].sort((a, b) => (a === null ? 1 : b === null ? -1 : a - b));
}

type OverlapPair = Overlap["summary"]["pairs"][number];
type OverlapLayer = Overlap["layers"][number];

/** Per layer, each pair's o1 (solid) and the o1 a random mask of B's density would have (dashed, same
 * colour), on one 0–100 % overlap axis. */
export function layerOverlapFigure(pairs: OverlapPair[], names: string[], layers: OverlapLayer[]): Figure {
  const x = layers.map((l) => layerLabel(l.layer ?? null));
  const data = pairs.flatMap((p, i) => {
    const pair = `${plotlyText(names[p.a])} ∧ ${plotlyText(names[p.b])}`;
    const color = LINE_COLORS[i % LINE_COLORS.length];
    const line = (name: string, dash: string, y: (number | null)[]) => ({
      type: "scatter",
      mode: "lines+markers",
      name,
      x,
      y,
      text: x.map(() => name),
      line: { color, dash },
      marker: { symbol: dash === "solid" ? "circle" : "circle-open" },
      hovertemplate: "%{text} · %{x}: %{y:.2f}%<extra></extra>",
    });
    return [
      line(
        `${pair}: o1`,
        "solid",
        layers.map((l) => (l.changed[p.a] ? (100 * l.both[i]) / l.changed[p.a] : null)),
      ),
      line(
        `${pair}: random baseline`,
        "dash",
        layers.map((l) => (l.numel ? (100 * l.changed[p.b]) / l.numel : null)),
      ),
    ];
  });
  return {
    data,
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 40 },
      height: 360,
      yaxis: { title: { text: "overlap o1 % (of A's changed weights)" }, range: [0, 100] },
      xaxis: { type: "category", categoryorder: "array", categoryarray: x },
      legend: { orientation: "h", y: -0.2 },
    },
  };
}

/** Pairwise overlap: cell (row r, column c) = the share of r's changed weights c also changed, the
 * number in the cell; a sequential scale from white (0 %) to dark blue (100 %). */
export function pairMatrixFigure(names: string[], pairs: OverlapPair[]): Figure {
  const labels = names.map(plotlyText);
  const n = labels.length;
  const z: (number | null)[][] = Array.from({ length: n }, (_, i) =>
    Array.from({ length: n }, (_, j) => (i === j ? 100 : null)),
  );
  const text: string[][] = Array.from({ length: n }, (_, i) =>
    labels.map((_, j) => (i === j ? "itself" : "")),
  );
  const share = (v: number | null) => (v === null ? null : 100 * v);
  for (const p of pairs) {
    z[p.a][p.b] = share(p.o1);
    z[p.b][p.a] = share(p.o2);
    text[p.a][p.b] =
      `${pct(p.o1, 1)} of ${labels[p.a]} also in ${labels[p.b]} (random ${pct(p.baseline1, 1)})`;
    text[p.b][p.a] =
      `${pct(p.o2, 1)} of ${labels[p.b]} also in ${labels[p.a]} (random ${pct(p.baseline2, 1)})`;
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
        texttemplate: "%{z:.1f}%",
        colorscale: "Blues",
        reversescale: true, // Plotly's Blues runs dark → light: high is dark once reversed
        zmin: 0,
        zmax: 100,
        colorbar: { title: { text: "overlap % · sequential 0–100", side: "right" } },
      },
    ],
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 60 },
      height: 320,
      xaxis: { title: { text: "also changed by" }, type: "category" },
      yaxis: { title: { text: "share of" }, autorange: "reversed", type: "category" },
    },
  };
}
