// Principal geometry of ΔW against the base W₀, and where the update mask falls: layer × matrix-type
// heatmaps on the pair overview, and one matrix's figures (energy vs k, spectral drift, principal
// angles, intruders, enrichment counts) in the matrix view.
import { get, type GeometryView, type TensorDetail } from "../api";
import {
  COLOUR_SCALES,
  cellTextFits,
  colourAxis,
  formatScaled,
  layerLabel,
  plotlyText,
  type ColourScale,
  type Figure,
} from "../charts";
import type { Context } from "../context";
import { h, panel } from "../dom";
import { int, sci } from "../format";
import { plotInto } from "../plot";

type Grid = (number | null)[][];
type TensorGeometry = NonNullable<TensorDetail["geometry"]>;

const caption = (text: string) => h("p", { class: "muted caption" }, text);
const fixed = (v: number | null | undefined, digits = 3) =>
  v === null || v === undefined ? "–" : v.toFixed(digits);

/** A layer × matrix grid in its scale (charts.COLOUR_SCALES: shares fixed to 0–100 %, enrichment
 * diverging around 1), each cell's value inside it when the grid is small. */
function gridFigure(view: GeometryView, values: Grid, s: ColourScale): Figure {
  const hovertext = values.map((row, i) =>
    row.map((v, j) =>
      [
        `${plotlyText(layerLabel(view.layers[i]))} · ${plotlyText(view.matrices[j])}`,
        `${s.label}: ${formatScaled(s, v)}`,
      ].join("<br>"),
    ),
  );
  const z = values.map((row) => row.map((v) => (v === null ? null : v * s.factor)));
  const withText = cellTextFits(view.layers.length, view.matrices.length);
  return {
    data: [
      {
        type: "heatmap",
        z,
        x: view.matrices.map(plotlyText),
        y: view.layers.map((l) => plotlyText(layerLabel(l))),
        hovertext,
        hoverinfo: "text",
        hoverongaps: false,
        ...(withText
          ? {
              text: values.map((row) => row.map((v) => (v === null ? "" : formatScaled(s, v)))),
              texttemplate: "%{text}",
              textfont: { size: 10 },
            }
          : {}),
        ...colourAxis(s, false),
      },
    ],
    layout: {
      margin: { l: 80, r: 20, t: 10, b: 40 },
      xaxis: { type: "category" },
      yaxis: { autorange: "reversed", type: "category" },
      height: Math.max(240, 22 * view.layers.length + 80),
    },
  };
}

/** The "Geometry" panel of a pair overview (appended to `slot` once its figures arrive). */
export async function geometryPanel(ctx: Context, slot: HTMLElement): Promise<void> {
  const view = await get<GeometryView>(`/api/analyses/${ctx.state.analysis}/geometry`).catch(() => null);
  if (!view || !view.layers.length || !ctx.alive()) return; // none (older result, --no-geometry) or gone
  const p = panel(slot, "Geometry — ΔW against the base's principal directions");
  p.id = "geometry-panel";
  const row = h("div", { class: "grid2" });
  p.append(row);
  const magnitude = view.enrichment.find((e) => e.selector === "magnitude" && e.percent === 1);
  const principal = view.enrichment.find((e) => e.selector === "principal" && e.percent === 1);
  const figures: [string, Grid | undefined, ColourScale, string][] = [
    [
      "Energy in top-8",
      view.energy_in_top8,
      COLOUR_SCALES.energy_share,
      "Share of ‖ΔW‖² inside the base's top-8 left and right singular subspaces (1 = the update only rescales principal directions).",
    ],
    [
      "Rank-1 dominance",
      view.rank1_dominance,
      COLOUR_SCALES.rank1_dominance,
      "Share of ‖ΔW‖² carried by its largest singular direction (1 = a rank-1 update).",
    ],
    [
      "Enrichment in the largest 1 % of |W₀|",
      magnitude?.ratio,
      COLOUR_SCALES.enrichment,
      `Changed weights (τ = ${sci(view.tau ?? 0)}) among the 1 % largest base weights, over what a random mask of the same size would hit (1 = no preference).`,
    ],
    [
      "Enrichment in the principal weights (top 1 % of rank-8 W₀)",
      principal?.ratio,
      COLOUR_SCALES.enrichment,
      "The same ratio for the 1 % largest entries of the base's rank-8 reconstruction U₈Σ₈V₈ᵀ.",
    ],
  ];
  for (const [title, values, scale, text] of figures) {
    if (!values) continue;
    const cell = h("div", {}, h("h3", {}, title), caption(text));
    row.append(cell);
    plotInto(cell, gridFigure(view, values, scale), title);
  }
}

function lineFigure(
  x: number[],
  series: [string, (number | null)[]][],
  ytitle: string,
  xtitle: string,
): Figure {
  return {
    data: series.map(([name, y]) => ({ type: "scatter", mode: "lines+markers", name, x, y })),
    layout: {
      margin: { l: 60, r: 20, t: 10, b: 40 },
      xaxis: { title: { text: xtitle }, type: "category" },
      yaxis: { title: { text: ytitle } },
      height: 260,
      legend: { orientation: "h" },
    },
  };
}

/** One matrix's geometry figures, appended to the matrix view's grid. */
export function geometryFigures(grid: HTMLElement, g: TensorDetail["geometry"]): void {
  if (!g || !g.k) return;
  const k = g.k;
  const p = panel(grid, "Geometry of ΔW against W₀");
  p.id = "tensor-geometry";
  p.append(
    caption("Share of ‖ΔW‖² inside the base's top-k singular subspaces (both sides, left only, right only)."),
  );
  if (g.energy_in_topk)
    plotInto(
      p,
      lineFigure(
        k,
        [
          ["both", g.energy_in_topk],
          ["left", g.left_in_topk ?? []],
          ["right", g.right_in_topk ?? []],
        ],
        "share of ‖ΔW‖²",
        "k",
      ),
      "energy share vs k",
    );
  else p.append(h("p", {}, "ΔW = 0: no energy to share."));
  const drift = g.drift ?? [];
  const q = panel(grid, "Spectral drift and principal angles");
  q.append(caption("σᵢ(W₁)/σᵢ(W₀) for the top singular values (1 = unchanged)."));
  plotInto(
    q,
    {
      data: [{ type: "bar", x: drift.map((_, i) => i + 1), y: drift }],
      layout: {
        margin: { l: 60, r: 20, t: 10, b: 40 },
        xaxis: { title: { text: "i" } },
        yaxis: { title: { text: "σᵢ(W₁)/σᵢ(W₀)" } },
        height: 220,
      },
    },
    "spectral drift",
  );
  q.append(
    caption(
      "Largest principal angle between the top-k singular subspaces of W₀ and W₁ (0° = same subspace).",
    ),
  );
  if (g.angles)
    plotInto(
      q,
      lineFigure(
        k,
        [
          ["left", g.angles.left_max_deg],
          ["right", g.angles.right_max_deg],
        ],
        "degrees",
        "k",
      ),
      "principal angles",
    );
  const e = g.enrichment;
  const r = panel(grid, "Intruders and where the mask falls");
  r.append(
    caption(
      `Intruders: W₁'s top-k left singular vectors with no |cosine| > ${g.intruders?.threshold ?? 0.5} among W₀'s top 2k.`,
    ),
    h(
      "ul",
      {},
      ...k.map((kk, i) =>
        h(
          "li",
          {},
          `k = ${kk}: ${g.intruders?.count[i] ?? 0}` +
            (g.intruders?.indices[i]?.length ? ` (positions ${g.intruders.indices[i].join(", ")})` : ""),
        ),
      ),
    ),
  );
  if (!e) return;
  r.append(
    caption(
      `Changed weights (${int(e.changed)} of ${int(e.numel)} at τ = ${sci(e.tau)}) inside the top p % of |W₀| and of |rank-${e.principal_k} W₀|, against a random mask of the same size.`,
    ),
  );
  const rows = (["magnitude", "principal"] as const).flatMap((sel) =>
    e[sel].map((s) =>
      h(
        "tr",
        {},
        h("td", {}, sel === "magnitude" ? "largest |W₀|" : `largest |rank-${e.principal_k} W₀|`),
        h("td", {}, `${s.percent} %`),
        h("td", {}, int(s.selected)),
        h("td", {}, int(s.observed)),
        h("td", {}, fixed(s.expected, 1)),
        h("td", {}, fixed(s.ratio, 2)),
      ),
    ),
  );
  r.append(
    h(
      "table",
      { id: "enrichment-table" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ...["selection", "top", "|P|", "observed", "expected", "ratio"].map((c) => h("th", {}, c)),
        ),
      ),
      h("tbody", {}, ...rows),
    ),
  );
}
