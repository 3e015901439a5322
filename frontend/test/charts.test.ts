import { describe, expect, it } from "vitest";
import {
  changedAbove,
  circleDistance,
  curveFigure,
  formatMetric,
  gridAt,
  heatmapFigure,
  histogramFigure,
  nearestEdge,
} from "../src/charts";
import { count } from "../src/format";

const edges = Array.from({ length: 225 }, (_, i) => 10 ** ((i - 192) / 16));

describe("histogram arithmetic", () => {
  it("counts weights above an edge", () => {
    // bins: [0], (0,E0], (E0,E1], (E1,E2], (E2,inf]
    const hist = [5, 1, 2, 3, 4];
    expect(changedAbove(hist, -1)).toBe(10);
    expect(changedAbove(hist, 0)).toBe(9);
    expect(changedAbove(hist, 2)).toBe(4);
  });
  it("snaps τ to the nearest edge in log space", () => {
    expect(nearestEdge(edges, 1e-5)).toBe(112);
    expect(nearestEdge(edges, 1.2e-5)).toBe(113);
    expect(nearestEdge(edges, 0)).toBe(-1);
  });
  it("builds the sparsity grid from per-cell histograms", () => {
    const cube = {
      layers: [0, 1],
      matrices: ["q", "k"],
      numel: [
        [10, 10],
        [10, null],
      ],
      hist: [
        [
          [5, 1, 2, 2],
          [10, 0, 0, 0],
        ],
        [[0, 0, 0, 10], null],
      ],
      bin_edges: [1e-3, 1e-2],
    };
    const g = gridAt(cube, 0);
    expect(g.changed).toEqual([
      [4, 0],
      [10, null],
    ]);
    expect(g.sparsity).toEqual([
      [0.6, 1],
      [0, null],
    ]);
  });
});

describe("figures", () => {
  it("heatmap: one cell per layer x matrix, exact counts in the hover text", () => {
    const f = heatmapFigure({
      layers: [0, null],
      matrices: ["q", "norm"],
      values: [
        [0.75, 1],
        [0.5, null],
      ],
      changed: [
        [25, 0],
        [50, null],
      ],
      numel: [
        [100, 10],
        [100, null],
      ],
      metric: "sparsity",
      scale: "linear",
      tauLabel: "1.00e-5",
    });
    expect(f.data[0].z).toEqual([
      [75, 100],
      [50, null],
    ]);
    expect(f.data[0].y).toEqual(["layer 0", "other"]);
    expect(f.data[0].hovertext[0][0]).toContain("changed 25 of 100");
    expect(f.data[0].hovertext[0][0]).toContain("75.00%");
    expect(f.data[0].text[0][0]).toBe("75.00%"); // a small grid: the value inside the cell
    expect([f.data[0].zmin, f.data[0].zmax]).toEqual([0, 100]);
    expect(f.data[0].colorbar.title.text).toBe("unchanged<br>% of weights (sequential)");
  });
  it("heatmap: log scale only for magnitude metrics", () => {
    const base = {
      layers: [0],
      matrices: ["q"],
      values: [[1e-3]],
      metric: "mean_abs_delta" as const,
      tauLabel: "",
    };
    expect(heatmapFigure({ ...base, scale: "log" }).data[0].z).toEqual([[-3]]);
    expect(heatmapFigure({ ...base, metric: "sparsity", scale: "log" }).data[0].z).toEqual([[0.1]]);
    const log = heatmapFigure({ ...base, scale: "log" }).data[0];
    expect(log.zmin).toBeUndefined(); // a magnitude: the data's own range
    expect(log.customdata).toEqual([[1e-3]]); // what CSV exports: never the log
    expect(log.colorbar.title.text).toBe("log10 mean |Δ|<br>(sequential)");
  });
  it("curve and histogram mark τ", () => {
    expect(curveFigure({ tau: [1e-5, 1e-4], sparsity: [0.5, 0.9] }, 1e-4).layout.shapes[0].x0).toBe(1e-4);
    const hist = [7, ...Array(226).fill(1)];
    const f = histogramFigure(hist, edges, 1e-5, "|Δ|");
    expect(f.data[0].x).toHaveLength(224);
    expect(f.layout.title.text).toContain("7 exactly unchanged");
  });
  it("formats metrics", () => {
    expect(formatMetric("sparsity", 0.123456)).toBe("12.35%");
    expect(formatMetric("rank_pct", 99.46)).toBe("99.5%");
    expect(formatMetric("relative_change", 0.00123)).toBe("1.23e-3");
    expect(formatMetric("effective_rank", null)).toBe("–");
  });
});

describe("Venn", () => {
  it("circle distance reproduces the overlap area", () => {
    const [a, b, both] = [100, 60, 30];
    const d = circleDistance(a, b, both);
    const ra = Math.sqrt(a / Math.PI),
      rb = Math.sqrt(b / Math.PI);
    expect(d).toBeGreaterThan(Math.abs(ra - rb));
    expect(d).toBeLessThan(ra + rb);
    expect(circleDistance(a, b, 0)).toBeCloseTo(ra + rb, 6);
  });
});

describe("counts", () => {
  it("groups thousands as en-US Intl does", () => {
    const intl = new Intl.NumberFormat("en-US");
    for (const n of [0, 7, 999, 1000, 12345, 1234567, 9007199254740991, 1234.5678, 1e21])
      expect(count(n)).toBe(intl.format(n));
  });
});
