// Overlap of several runs from one base: pairwise table against random baselines, Venn diagram
// (up to three runs), pairwise matrix, and per-layer overlap against its baseline.
import { get, type Overlap } from "../api";
import { compareFigure, overlapMatrixFigure, vennFigure } from "../charts";
import type { Context } from "../context";
import { h, panel } from "../dom";
import { int, pct, sci } from "../format";
import { caption, upsetFigure } from "../maskcharts";
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
  const columns = ["pair", "both", "o1", "random", "o2", "random", "Jaccard", "lift", "z", "same sign Δ"];
  const num = (x: number | null | undefined, digits: number) => (x == null ? "–" : x.toFixed(digits));
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
            h("td", { class: "num", title: `random baseline ${num(p.baseline, 1)} weights` }, num(p.lift, 2)),
            h("td", { class: "num" }, num(p.z, 1)),
            h(
              "td",
              { class: "num", title: `${int(p.same_sign)} same, ${int(p.opposite_sign)} opposite` },
              pct(p.sign_agreement, 1),
            ),
          ),
        ),
      ),
    ),
    caption(
      "lift = both / the overlap expected of random masks of each run's density in every matrix (summed); " +
        "z = hypergeometric z-score of that excess; same sign Δ = share of the shared weights moved in the same direction.",
    ),
  );
  const row = h("div", { class: "grid2" });
  root.append(row);
  const venn = s.venn ? panel(row, "Venn (areas proportional to counts)") : null;
  if (venn && s.venn)
    plotInto(venn, vennFigure(short, s.changed, s.venn, s.numel, s.pairs), "Venn diagram of update masks");
  const matrix = panel(row, "Pairwise overlap (row run's share)");
  plotInto(matrix, overlapMatrixFigure(short, s.pairs), "pairwise overlap matrix");
  matrix.append(
    caption("Each cell: the share of the row run's changed weights that the column run also changed."),
  );
  venn?.append(caption("Weights changed in each combination of runs, areas proportional to the counts."));
  if (o.runs.length >= 3 && s.upset) {
    const upset = panel(root, "Intersections of the update masks (UpSet)");
    upset.id = "upset";
    plotInto(upset, upsetFigure(labels, s.upset), "UpSet chart of update masks");
    upset.append(
      caption(
        "Each bar counts the weights changed in exactly the runs dotted below it (largest 40 non-empty sets); hover for the count in at least those runs.",
      ),
    );
  }
  if (s.by_matrix) root.append(liftTable(s.by_matrix, pairsLabel(s.pairs, short)));

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
  layerPanel.append(
    caption(
      "Per layer, the share of run A's changed weights also changed by B, against a random mask of B's density.",
    ),
  );
}

type Pair = Overlap["summary"]["pairs"][number];
type Group = NonNullable<Overlap["summary"]["by_matrix"]>[number];

const pairsLabel = (pairs: Pair[], short: string[]) => pairs.map((p) => `${short[p.a]} ∧ ${short[p.b]}`);

/** Per matrix type: each pair's observed shared weights, its random baseline and the lift. */
function liftTable(groups: Group[], pairs: string[]): HTMLElement {
  const section = h("section", { class: "panel" }, h("h2", {}, "Overlap per matrix type against random"));
  section.append(
    h(
      "table",
      { id: "overlap-by-matrix" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "matrix"),
          ...pairs.map((p) => h("th", { class: "num" }, `${p}: both / random (lift)`)),
        ),
      ),
      h(
        "tbody",
        {},
        ...groups.map((g) =>
          h(
            "tr",
            {},
            h("td", {}, g.matrix ?? "–"),
            ...g.pairs.map((p) =>
              h(
                "td",
                { class: "num", title: `z = ${p.z == null ? "–" : p.z.toFixed(1)}` },
                `${int(p.both)} / ${p.baseline.toFixed(0)} (${p.lift == null ? "–" : p.lift.toFixed(2)})`,
              ),
            ),
          ),
        ),
      ),
    ),
    caption(
      "Shared changed weights of each pair in each matrix type, against the sum of per-matrix random baselines.",
    ),
  );
  return section;
}
