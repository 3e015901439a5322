import { describe, expect, it } from "vitest";
import { DEFAULTS, format, parse } from "../src/state";
import { compareLayersFigure, differenceFigure, heatmapDifference } from "../src/comparecharts";
import {
  layerOrder,
  layerOverlapFigure,
  pairMatrixFigure,
  splitFigure,
  stepAxis,
  stepNumber,
  transientFigure,
} from "../src/maskcharts";
import { labelAngles, regionName, regionOrder, vennCenters, vennFigure } from "../src/venn";

describe("series steps", () => {
  it("reads the step a checkpoint's name carries", () => {
    expect(stepNumber("/runs/a/checkpoint-500")).toBe(500);
    expect(stepNumber("step_1000")).toBe(1000);
    expect(stepNumber("out/global_step_20/")).toBe(20);
    expect(stepNumber("x/step3")).toBe(3);
    expect(stepNumber("x/model-sft.safetensors")).toBeNull();
  });
  it("uses real steps only when every checkpoint names an increasing one", () => {
    expect(stepAxis(["a/checkpoint-10", "a/checkpoint-250"]).x).toEqual([10, 250]);
    const mixed = stepAxis(["a/checkpoint-10", "a/final"]);
    expect(mixed.x).toEqual([1, 2]);
    expect(mixed.steps).toBe(false);
    expect((mixed.xaxis as { ticktext: string[] }).ticktext).toEqual(["checkpoint-10", "final"]);
  });
});

describe("layers", () => {
  it("orders layers numerically, other last, for any mix of depths", () => {
    expect(layerOrder([0, 1, null, 0, 1, 2, 3, 10, null])).toEqual([0, 1, 2, 3, 10, null]);
  });
});

describe("Venn", () => {
  const changed = [400, 300, 200];
  const both = (a: number, b: number) =>
    [
      [0, 120, 80],
      [0, 0, 60],
    ][a][b];
  it("names regions in words", () => {
    expect(regionName("100", ["A", "B", "C"])).toBe("only A");
    expect(regionName("110", ["A", "B", "C"])).toBe("A and B, not C");
    expect(regionName("111", ["A", "B", "C"])).toBe("all of A, B, C");
    expect(regionName("11", ["A", "B"])).toBe("both A and B");
  });
  it("gives every label a slot of its own", () => {
    const angles = labelAngles(vennCenters(changed, both));
    expect(new Set(angles).size).toBe(3);
    expect(labelAngles(vennCenters([5, 5], () => 5)).sort()).toEqual([0, 180]); // identical circles
  });
  it("puts every label outside every circle", () => {
    const fig = vennFigure(["A", "B", "C"], changed, both);
    for (const a of fig.layout.annotations)
      for (const s of fig.layout.shapes) {
        const r = (s.x1 - s.x0) / 2;
        expect(Math.hypot(a.ax - (s.x0 + r), a.ay - (s.y0 + r))).toBeGreaterThan(r);
      }
  });
});

describe("overlap figures", () => {
  const pair = { a: 0, b: 1, both: 10, o1: 0.5, o2: 0.25, baseline1: 0.1, baseline2: 0.05, jaccard: 0.2 };
  it("draws each baseline dashed in its pair's colour, on an overlap axis", () => {
    const fig = layerOverlapFigure(
      [pair],
      ["A", "B"],
      [{ layer: 0, numel: 100, changed: [20, 40], both: [10] }],
    );
    expect(fig.layout.yaxis.title.text).toMatch(/overlap/);
    const [o1, base] = fig.data;
    expect(o1.line.color).toBe(base.line.color);
    expect(base.line.dash).toBe("dash");
    expect(o1.y).toEqual([50]);
    expect(base.y).toEqual([40]);
  });
  it("writes the numbers into the matrix cells on a fixed 0–100 scale", () => {
    const t = pairMatrixFigure(["A", "B"], [pair]).data[0];
    expect(t.z).toEqual([
      [100, 50],
      [25, 100],
    ]);
    expect([t.zmin, t.zmax, t.texttemplate]).toEqual([0, 100, "%{z:.1f}%"]);
  });
});

describe("difference heatmap", () => {
  const map = (layers: (number | null)[], values: (number | null)[][]) =>
    ({ layers, matrices: ["q", "k"], values }) as never;
  it("subtracts cell by cell on the union of layers, other last", () => {
    const a = map(
      [0, 1, null],
      [
        [0.5, 0.5],
        [0.2, null],
        [0.9, 0.9],
      ],
    );
    const b = map(
      [0, 1, 2, 3, null],
      [
        [0.25, 0.5],
        [0.1, 0.1],
        [0, 0],
        [0, 0],
        [1, 1],
      ],
    );
    const d = heatmapDifference(a, b, 100);
    expect(d.layers).toEqual([0, 1, 2, 3, null]);
    expect(d.z[0]).toEqual([25, 0]);
    expect(d.z[1][1]).toBeNull();
    expect(d.z[2]).toEqual([null, null]);
    const t = differenceFigure(a, b, "sparsity", ["x", "y"]).data[0];
    expect([t.zmin, t.zmid, t.zmax]).toEqual([-100, 0, 100]);
  });
});

describe("Venn regions", () => {
  it("are listed single runs first, then pairs, then all", () => {
    expect(regionOrder(["111", "110", "001", "100", "011", "010", "101"])).toEqual([
      "100",
      "010",
      "001",
      "110",
      "101",
      "011",
      "111",
    ]);
  });
});

describe("compare permalink", () => {
  it("keeps the metric and τ in the URL", () => {
    const s = {
      ...DEFAULTS,
      view: "compare" as const,
      ids: ["0123456789ab"],
      metric: "rank_pct" as const,
      tau: 1e-3,
    };
    const url = new URL(format(s), "http://x");
    expect(url.search).toContain("metric=rank_pct");
    expect(parse(url.pathname, url.search)).toEqual(s);
  });
});

describe("names are text in the new figures", () => {
  const HOSTILE = '<a href="https://example.com">x</a>';
  const raw = (fig: object) => JSON.stringify(fig).includes("<a href");
  it("escapes run, checkpoint, analysis and matrix names", () => {
    const pair = { a: 0, b: 1, both: 1, o1: 0.5, o2: 0.5, baseline1: 0.1, baseline2: 0.1, jaccard: 0.3 };
    const step = {
      checkpoint: `runs/${HOSTILE}`,
      changed: 2,
      outside_final: 1,
      transient_fraction: 0.5,
    } as never;
    const compared = { analysis: "a", base: "b", target: "t", sparsity: 0.5, value: 0.5, layers: [] };
    const map = { layers: [0], matrices: [HOSTILE], values: [[0.5]] } as never;
    for (const fig of [
      vennFigure([HOSTILE, "B"], [10, 10], () => 5),
      pairMatrixFigure([HOSTILE, "B"], [pair]),
      layerOverlapFigure([pair], [HOSTILE, "B"], []),
      transientFigure([step]),
      splitFigure([step], 10),
      compareLayersFigure([{ ...compared, label: HOSTILE }], "sparsity"),
      differenceFigure(map, map, "sparsity", [HOSTILE, HOSTILE]),
    ])
      expect(raw(fig)).toBe(false);
  });
});
