// Overlap of several runs from one base: pairwise table against random baselines, Venn diagram
// (up to three runs) with its regions in words, pairwise matrix, and per-layer overlap against its
// baseline.
import { get, type Overlap } from "../api";
import type { Context } from "../context";
import { h, panel } from "../dom";
import { int, pct, sci } from "../format";
import { caption, layerOverlapFigure, pairMatrixFigure, upsetFigure } from "../maskcharts";
import { plotInto } from "../plot";
import { regionName, regionOrder, vennFigure } from "../venn";
import { finishedAnalysis } from "./analysis";

/** The last two parts of a path: enough to tell runs apart. */
const shortName = (path: string) => path.split("/").filter(Boolean).slice(-2).join("/");

/** What each column of the pair table means, one sentence each (shown under the table). */
const TERMS: [string, string][] = [
  ["o1", "the share of A's changed weights that B changed too: |A ∧ B| / |A|."],
  ["o2", "the share of B's changed weights that A changed too: |A ∧ B| / |B|."],
  [
    "random",
    "what o1 (or o2) would be if the other run's changes fell at random with the same density: |B| / N (or |A| / N).",
  ],
  [
    "lift",
    "both / the overlap expected of random masks of each run's density in every matrix (summed): 1 = chance, 2 = twice chance.",
  ],
  ["z", "how many standard deviations (hypergeometric) the shared count lies above that random expectation."],
  ["same sign Δ", "of the shared weights, the share both runs moved in the same direction."],
];

export async function renderOverlap(ctx: Context): Promise<void> {
  if (!(await finishedAnalysis(ctx))) return;
  const { root, state } = ctx;
  const o = await get<Overlap>(`/api/analyses/${state.analysis}/overlap`);
  if (!ctx.alive()) return;
  const letter = (i: number) => String.fromCharCode(65 + i);
  const labels = o.runs.map((r, i) => `${letter(i)}: ${shortName(r)}`);
  const short = o.runs.map((_, i) => letter(i));
  const s = o.summary;
  const columns = [
    "pair A ∧ B",
    "both",
    "o1",
    "random o1",
    "o2",
    "random o2",
    "Jaccard",
    "lift",
    "z",
    "same sign Δ",
  ];
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
    h(
      "dl",
      { class: "terms", id: "overlap-terms" },
      ...TERMS.flatMap(([term, text]) => [h("dt", {}, term), h("dd", {}, text)]),
    ),
  );
  const row = h("div", { class: "grid2" });
  root.append(row);
  if (s.venn) row.append(vennPanel(s, s.venn, short));
  const matrix = panel(row, "Pairwise overlap (row run's share)");
  plotInto(matrix, pairMatrixFigure(short, s.pairs), "pairwise overlap matrix");
  matrix.append(
    caption("Each cell: the share of the row run's changed weights that the column run also changed."),
  );
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

  const layerPanel = panel(root, "Per layer: overlap o1 of each pair vs its random baseline");
  layerPanel.id = "overlap-layers";
  plotInto(layerPanel, layerOverlapFigure(s.pairs, short, o.layers), "per-layer overlap");
  layerPanel.append(
    caption(
      "Per layer, the share of run A's changed weights also changed by B (solid), against the share a random mask of B's density would give (dashed, same colour).",
    ),
  );
}

/** The Venn diagram and, beside it, every region's count named in words. */
function vennPanel(s: Overlap["summary"], regions: Record<string, number>, short: string[]): HTMLElement {
  const venn = h(
    "section",
    { class: "panel", id: "venn" },
    h("h2", {}, "Venn (areas proportional to counts)"),
  );
  const both = (a: number, b: number) => s.pairs.find((p) => p.a === a && p.b === b)?.both ?? 0;
  plotInto(venn, vennFigure(short, s.changed, both), "Venn diagram of update masks");
  venn.append(
    h(
      "table",
      { id: "venn-regions" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "region"),
          h("th", { class: "num" }, "weights"),
          h("th", { class: "num" }, "of all"),
        ),
      ),
      h(
        "tbody",
        {},
        ...regionOrder(Object.keys(regions)).map((bits) =>
          h(
            "tr",
            {},
            h("td", {}, regionName(bits, short)),
            h("td", { class: "num" }, int(regions[bits])),
            h("td", { class: "num" }, pct(regions[bits] / s.numel)),
          ),
        ),
      ),
    ),
    caption(`Weights changed in each combination of runs, of N = ${int(s.numel)} compared weights.`),
  );
  return venn;
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
