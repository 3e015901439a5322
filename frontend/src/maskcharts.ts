// Charts of update masks across runs / checkpoints (issue 13, items 4–5): the UpSet chart of an
// overlap, and a series' first-change bars, transient-share heatmap and ‖Δ‖ per step. Pure
// functions from API data to Plotly figures, like charts.ts.
import type { Overlap, Series } from "./api";
import { type Figure, layerLabel, plotlyText } from "./charts";
import { h } from "./dom";
import { count } from "./format";

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
  const x = steps.map((_, i) => i + 1);
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
      xaxis: { title: { text: "checkpoint" }, tickvals: x, ticktext: names },
      yaxis: { title: { text: "weights first changed" } },
      legend: { orientation: "h", y: 1.15 },
    },
  };
}

/** ‖θ_t − θ₀‖₂ per checkpoint (absolute); the relative one, ‖θ_t − θ₀‖₂ / ‖θ₀‖₂, in the hover. */
export function normFigure(steps: Step[]): Figure {
  const x = steps.map((_, i) => i + 1);
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
      xaxis: { title: { text: "checkpoint" }, tickvals: x, ticktext: names },
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
        colorscale: "Viridis",
        colorbar: { title: { text: "transient %", side: "right" } },
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
