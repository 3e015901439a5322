import { describe, expect, it } from "vitest";
import { COLOUR_SCALES, heatmapFigure } from "../src/charts";
import { NAMED_SCALES, colourScale, quickable, textColour } from "../src/quickheatmap";
// @ts-expect-error: vite's ?raw import (the file's text); no vite/client types in this project
import scalesSource from "plotly.js/src/components/colorscale/scales.js?raw";

/** plotly.js' own colour scale table (its module, run without the colour helpers it needs for nothing here). */
function plotlyScales(): Record<string, [number, string][]> {
  const module = { exports: {} as any };
  new Function("require", "module", "exports", scalesSource)(() => ({}), module, module.exports);
  return module.exports.scales;
}

describe("quick heatmap colours", () => {
  it("has every scale COLOUR_SCALES names, stop for stop as plotly.js defines it", () => {
    const plotly = plotlyScales();
    for (const s of Object.values(COLOUR_SCALES))
      expect(NAMED_SCALES[s.colorscale]).toEqual(plotly[s.colorscale]);
  });
  it("paints a stop its colour, and between stops as Plotly rounds", () => {
    const viridis = colourScale("Viridis", true, 0, 100); // sparsity: 100 % unchanged is dark
    expect(viridis(100)).toEqual([68, 1, 84]);
    expect(viridis(0)).toEqual([253, 231, 37]);
    expect(viridis(150)).toEqual([68, 1, 84]); // clamped
    expect(viridis(-3)).toEqual([253, 231, 37]);
    expect(colourScale("YlGnBu", false, 0, 100)(50)).toEqual([65, 182, 196]);
    // halfway between RdBu's first stops: 55.5, 73.5, 209.5 round up
    expect(colourScale("RdBu", false, 0, 1)(0.175)).toEqual([56, 74, 210]);
    // what Plotly 4.1.1 drew for cells of a real overview (pixels read from its heatmap image)
    expect(viridis(80.731201171875)).toEqual([66, 65, 134]);
    expect(viridis(80.657958984375)).toEqual([65, 65, 134]);
    expect(viridis(80.41839599609375)).toEqual([65, 66, 135]);
  });
  it("writes cell text white on dark cells, Plotly's grey on light ones", () => {
    expect(textColour([66, 65, 134])).toBe("rgb(255, 255, 255)");
    expect(textColour([253, 231, 37])).toBe("rgb(68, 68, 68)");
  });
});

describe("which heatmaps draw quick", () => {
  const figure = (metric: "sparsity" | "relative_change", scale: "linear" | "log") =>
    heatmapFigure({
      layers: [0, 1],
      matrices: ["q", "k"],
      values: [
        [0.5, 0.25],
        [null, 1],
      ],
      metric,
      scale,
      tauLabel: "1e-5",
    });
  it("draws shares (fixed 0–100 % range), not magnitudes scaled to their data", () => {
    expect(quickable(figure("sparsity", "linear"), 800)).toBe(true);
    expect(quickable(figure("sparsity", "log"), 800)).toBe(true); // shares ignore log
    expect(quickable(figure("relative_change", "linear"), 800)).toBe(false);
  });
  it("needs room for a plot beside the colour bar (0: not laid out)", () => {
    expect(quickable(figure("sparsity", "linear"), 0)).toBe(false);
    expect(quickable(figure("sparsity", "linear"), 150)).toBe(false);
  });
});
