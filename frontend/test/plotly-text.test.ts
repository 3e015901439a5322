import { describe, expect, it } from "vitest";
import {
  barsFigure,
  heatmapFigure,
  histogramFigure,
  plotlyText,
  profileFigure,
  type Figure,
} from "../src/charts";
import { compareLayersFigure } from "../src/comparecharts";
import { pairMatrixFigure, splitFigure, transientFigure } from "../src/maskcharts";
import { vennFigure } from "../src/venn";

const HOSTILE = '<a href="https://example.com">x</a><span style="font-size:80px">big</span> & %{x} &lt;';

/** What Plotly shows for a string: its pseudo-HTML tags are markup, its entities become characters
 * (the same rule as Plotly's svg_text_utils.convertEntities). Here: the text between the tags. */
function plotlyShows(s: string): { tags: string[]; text: string } {
  const entities: Record<string, string> = { lt: "<", gt: ">", amp: "&", quot: '"', nbsp: "\u00a0" };
  const tags = s.match(/<[^<>]*>/g) ?? [];
  const text = s
    .split(/<[^<>]*>/)
    .join("")
    .replace(/&(#\d+|#x[\da-fA-F]+|[a-z]+);/g, (m, e: string) =>
      e[0] === "#"
        ? String.fromCodePoint(e[1] === "x" ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10))
        : (entities[e] ?? m),
    );
  return { tags, text };
}

/** Every string anywhere in a figure (data and layout). */
function strings(x: unknown, out: string[] = []): string[] {
  if (typeof x === "string") out.push(x);
  else if (Array.isArray(x)) x.forEach((v) => strings(v, out));
  else if (x && typeof x === "object") Object.values(x).forEach((v) => strings(v, out));
  return out;
}

/** Plotly strings that carry the hostile name must show it as text and add no markup of their own. */
function expectLiteral(fig: Figure, name = HOSTILE): void {
  const allowed = /^<(br|b|\/b|extra|\/extra)>$/; // the charts' own markup
  const layout = { ...fig.layout, meta: undefined }; // meta is data for tests, never drawn
  const all = strings([fig.data, layout]);
  expect(all.some((s) => plotlyShows(s).text.includes(name))).toBe(true);
  for (const s of all) {
    for (const tag of plotlyShows(s).tags) expect(tag).toMatch(allowed);
    expect(s).not.toContain("<a ");
    expect(s).not.toContain("<span");
  }
  for (const trace of fig.data)
    if (trace.hovertemplate) expect(trace.hovertemplate).not.toContain("example.com"); // names go in as text
}

describe("plotlyText", () => {
  it("escapes exactly &, < and >", () => {
    expect(plotlyText("<b>a & b</b>")).toBe("&lt;b&gt;a &amp; b&lt;/b&gt;");
    expect(plotlyText("&lt;")).toBe("&amp;lt;");
    expect(plotlyText("model.layers.0.q_proj [q] · 50% ∧ \"x\" 'y'")).toBe(
      "model.layers.0.q_proj [q] · 50% ∧ \"x\" 'y'",
    );
    expect(plotlyText("")).toBe("");
  });
  it("is shown by Plotly as the original text, with no markup", () => {
    for (const name of [HOSTILE, "<br>", "a&amp;b", "&#60;script&#62;", "<<>>&&", "x<sub>2</sub>"]) {
      const shown = plotlyShows(plotlyText(name));
      expect(shown.tags).toEqual([]);
      expect(shown.text).toBe(name);
    }
  });
});

describe("names reach every chart as text", () => {
  it("legends and hovers of the comparison", () => {
    const layers = [
      { layer: 0, sparsity: 0.5 },
      { layer: null, sparsity: 0.9 },
    ];
    const row = { analysis: "a", base: "b", target: "t", sparsity: 0.5, value: 0.5 };
    expectLiteral(
      compareLayersFigure(
        [
          { ...row, label: HOSTILE, layers: layers.map((l) => ({ ...l, value: l.sparsity })) },
          { ...row, label: "plain", layers: layers.map((l) => ({ ...l, value: l.sparsity })) },
        ] as never,
        "sparsity",
      ),
    );
  });
  it("tick labels and hovers of the heatmap and bars", () => {
    const fig = heatmapFigure({
      layers: [0],
      matrices: [HOSTILE],
      values: [[0.5]],
      changed: [[1]],
      numel: [[2]],
      metric: "sparsity",
      scale: "linear",
      tauLabel: "1e-5",
    });
    expectLiteral(fig);
    expect(fig.data[0].x).toEqual([plotlyText(HOSTILE)]);
    expectLiteral(barsFigure([{ label: HOSTILE, changed: 1, numel: 2 }], "1e-5"));
  });
  it("checkpoint names of a series, runs of an overlap, labels of histograms and profiles", () => {
    const folder = '<a href="x">x<span style="font-size:80px">big & %{x}'; // a folder name: no "/"
    const steps = [
      { checkpoint: `/models/${folder}`, changed: 1, outside_final: 0, transient_fraction: 0 },
    ] as never;
    for (const fig of [transientFigure(steps), splitFigure(steps, 10)]) expectLiteral(fig, folder);
    const pair = { a: 0, b: 1, both: 30, o1: 0.3, o2: 0.5, baseline1: 0.06, baseline2: 0.1, jaccard: 0.2 };
    expectLiteral(vennFigure([HOSTILE, "B"], [100, 60], () => 30));
    expectLiteral(pairMatrixFigure([HOSTILE, "B"], [pair] as never));
    const edges = [1e-3, 1e-2, 1e-1];
    expectLiteral(histogramFigure([1, 1, 1, 1, 1], edges, 1e-2, HOSTILE));
    expectLiteral(profileFigure([0.1, 0.2], HOSTILE));
  });
});
