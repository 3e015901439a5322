// Precision-aware change: how far each weight moved in steps (ULPs) of the base's stored dtype, the
// share that moved by at most one step, what stored checkpoints cannot show, and the visibility floor
// drawn on a matrix's relative histogram.
import type { PairSummary, TensorDetail } from "../api";
import type { Figure } from "../charts";
import { card, h, panel } from "../dom";
import { count, int, pct } from "../format";
import { plotInto } from "../plot";

type Precision = NonNullable<PairSummary["summary"]["precision"]>;
type UlpHistogram = NonNullable<TensorDetail["ulp_histogram"]>;

export const UNKNOWABLE =
  "Stored checkpoints cannot show updates smaller than one step of their dtype: an fp32 master weight " +
  "that moved by less than half a bf16 ULP rounds back to the same stored value and counts as unchanged " +
  "here; only the fp32 master weights (deltalens analyze --masters) tell those apart.";

const caption = (text: string) => h("p", { class: "muted caption" }, text);

/** Bin labels over the edges: "0", "1", …, "16", then the octaves "≤32" … "≤2^64" and "> 2^64". */
export function ulpLabels(edges: number[]): string[] {
  const pow = (x: number) => (x >= 1024 ? `2^${Math.log2(x)}` : String(x));
  return [
    "0",
    ...edges.map((e, i) => (i === 0 || e - edges[i - 1] === 1 ? String(e) : `≤${pow(e)}`)),
    `> ${pow(edges[edges.length - 1])}`,
  ];
}

/** Bars u = 0, 1, 2, … up to the last used one, then only the octaves that hold weights (exact
 * counts in the hover), log y. */
export function ulpFigure(counts: number[], edges: number[]): Figure {
  const exactBins = edges.filter((e, i) => i === 0 || e - edges[i - 1] === 1).length; // 1..16
  const last = Math.max(1, ...counts.slice(0, exactBins + 1).map((c, i) => (c > 0 ? i : 0)));
  const shown = counts.map((_, i) => i).filter((i) => i <= last || counts[i] > 0);
  const labels = ulpLabels(edges);
  const total = counts.reduce((a, b) => a + b, 0);
  return {
    data: [
      {
        type: "bar",
        x: shown.map((i) => labels[i]),
        y: shown.map((i) => counts[i]),
        text: shown.map((i) => `${count(counts[i])} weights (${pct(counts[i] / total)})`),
        hovertemplate: "u = %{x} ULP: %{text}<extra></extra>",
        textposition: "none",
        marker: { color: shown.map((i) => (i === 1 ? "#d62728" : "#1f77b4")) },
      },
    ],
    layout: {
      margin: { l: 60, r: 10, t: 10, b: 50 },
      height: 260,
      bargap: 0.1,
      xaxis: {
        type: "category",
        title: { text: "|Δ| in ULPs of the base's dtype (bin k: k−1 < u ≤ k)" },
      },
      yaxis: { type: "log", title: { text: "weights" } },
    },
  };
}

/** The ULP histogram, the one-ULP share and the sentence on what cannot be known, into `parent`. */
function ulpPanel(
  parent: HTMLElement,
  title: string,
  counts: number[],
  edges: number[],
  numel: number,
  id: string,
) {
  const p = panel(parent, title);
  p.id = id;
  const changed = numel - counts[0];
  p.append(
    h(
      "div",
      { class: "cards" },
      card("moved by at most one ULP (share of weights)", pct(counts[1] / numel), `${id}-share`),
      card("… of the weights whose stored value changed", changed ? pct(counts[1] / changed) : "–"),
      card("weights moved by at most one ULP", int(counts[1]), `${id}-count`),
    ),
  );
  plotInto(p, ulpFigure(counts, edges), "histogram of weight changes in ULPs");
  p.append(
    caption(
      "How far each weight moved, counted in steps (ULPs) of the base's stored dtype at its own value; " +
        "bin 1 (red) is the smallest change the dtype can store.",
    ),
    h("p", { class: "muted caption unknowable" }, UNKNOWABLE),
  );
  return p;
}

/** Pair overview: the whole model's ULP histogram and one-ULP share (nothing when no ULP grid). */
export function precisionPanel(root: HTMLElement, summary: PairSummary): void {
  const p: Precision | null | undefined = summary.summary.precision;
  if (!p || !p.numel) return;
  ulpPanel(
    root,
    `Precision: change in ULPs (${p.dtypes.join(", ")})`,
    p.ulp_hist,
    p.ulp_edges,
    p.numel,
    "precision",
  );
}

/** Matrix view: this matrix's ULP histogram. */
export function precisionFigures(parent: HTMLElement, t: TensorDetail): void {
  const u: UlpHistogram | null | undefined = t.ulp_histogram;
  if (!u) return;
  ulpPanel(parent, `Change in ULPs of ${u.dtype}`, u.counts, u.edges, t.numel, "precision");
}

/** The relative histogram with the dtype's visibility floor drawn: no stored change lies below it. */
export function withVisibilityFloor(fig: Figure, floor: number | undefined, dtype: string): Figure {
  if (!floor) return fig;
  const line = { dash: "dash", width: 2, color: "#7f7f7f" };
  return {
    data: fig.data,
    layout: {
      ...fig.layout,
      shapes: [
        ...(fig.layout.shapes ?? []),
        { type: "line", x0: floor, x1: floor, yref: "paper", y0: 0, y1: 1, line },
      ],
      annotations: [
        ...(fig.layout.annotations ?? []),
        {
          x: Math.log10(floor),
          yref: "paper",
          y: 1,
          xanchor: "right",
          showarrow: false,
          text: `${dtype} floor 2^${Math.log2(floor)}`,
          font: { size: 11 },
        },
      ],
    },
  };
}

export const floorCaption = (floor: number, dtype: string) =>
  caption(
    `Dashed line: the visibility floor of ${dtype}, 2^${Math.log2(floor)}: a stored ${dtype} value cannot ` +
      `change by less than this share of itself, so the relative histogram shows nothing below it.`,
  );
