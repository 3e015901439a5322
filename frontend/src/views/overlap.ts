// Overlap of several runs from one base: pairwise table against random baselines, Venn diagram
// (up to three runs), pairwise matrix, and per-layer overlap against its baseline.
import { get, type Overlap } from "../api";
import { compareFigure, overlapMatrixFigure, vennFigure } from "../charts";
import type { Context } from "../context";
import { h, panel } from "../dom";
import { int, pct, sci } from "../format";
import { plotInto } from "../plot";
import { finishedAnalysis } from "./analysis";

/** The last two parts of a path: enough to tell runs apart. */
const shortName = (path: string) => path.split("/").filter(Boolean).slice(-2).join("/");

export async function renderOverlap(ctx: Context): Promise<void> {
  if (!(await finishedAnalysis(ctx))) return;
  const { root, state } = ctx;
  const o = await get<Overlap>(`/api/analyses/${state.analysis}/overlap`);
  if (!ctx.alive()) return;
  const letter = (i: number) => String.fromCharCode(65 + i);
  const labels = o.runs.map((r, i) => `${letter(i)}: ${shortName(r)}`);
  const short = o.runs.map((_, i) => letter(i));
  const s = o.summary;
  const columns = ["pair", "both", "o1", "random", "o2", "random", "Jaccard"];
  root.replaceChildren(
    h("h1", {}, `Overlap of ${o.runs.length} runs`),
    h("p", { class: "muted" }, `τ = ${sci(o.tau)} · ${labels.join(" · ")}`),
    h(
      "table",
      { id: "overlap-pairs" },
      h("thead", {}, h("tr", {}, ...columns.map((x) => h("th", {}, x)))),
      h(
        "tbody",
        {},
        ...s.pairs.map((p) =>
          h(
            "tr",
            {},
            h("td", {}, `${short[p.a]} ∧ ${short[p.b]}`),
            h("td", { class: "num" }, int(p.both)),
            h("td", { class: "num" }, pct(p.o1, 1)),
            h("td", { class: "num muted" }, pct(p.baseline1, 1)),
            h("td", { class: "num" }, pct(p.o2, 1)),
            h("td", { class: "num muted" }, pct(p.baseline2, 1)),
            h("td", { class: "num" }, pct(p.jaccard, 1)),
          ),
        ),
      ),
    ),
  );
  const row = h("div", { class: "grid2" });
  root.append(row);
  if (s.venn) {
    const venn = panel(row, "Venn (areas proportional to counts)");
    plotInto(venn, vennFigure(short, s.changed, s.venn, s.numel, s.pairs), "Venn diagram of update masks");
  }
  const matrix = panel(row, "Pairwise overlap (row run's share)");
  plotInto(matrix, overlapMatrixFigure(short, s.pairs), "pairwise overlap matrix");

  const layerPanel = panel(root, "Per layer: o1 of each pair vs its random baseline");
  const pairs = s.pairs.map((p) => `${short[p.a]}∧${short[p.b]}`);
  const overlaps = s.pairs.map((p, i) => ({
    analysis: pairs[i],
    label: `${pairs[i]} overlap o1`,
    layers: o.layers.map((l) => ({
      layer: l.layer,
      sparsity: l.changed[p.a] ? l.both[i] / l.changed[p.a] : 0,
    })),
  }));
  const baselines = s.pairs.map((p, i) => ({
    analysis: `${pairs[i]}-random`,
    label: `${pairs[i]} random baseline`,
    layers: o.layers.map((l) => ({ layer: l.layer, sparsity: l.changed[p.b] / l.numel })),
  }));
  plotInto(layerPanel, compareFigure([...overlaps, ...baselines]), "per-layer overlap");
}
