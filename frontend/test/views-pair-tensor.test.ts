import { describe, expect, it } from "vitest";
import {
  COLOUR_SCALES,
  binBounds,
  formatScaled,
  profileFigure,
  scaleTitle,
  updateMapFigure,
} from "../src/charts";
import { fromPlotlyText, heatmapCsv, toCsv } from "../src/export";
import { layerNeighbours, uniqueLabels } from "../src/names";
import { format, parse } from "../src/state";
import { filterRows, sortRows, type Column } from "../src/table";

describe("colour scales", () => {
  it("shares are fixed to 0–100 % and named with their unit and kind", () => {
    for (const key of ["sparsity", "changed_share", "rank_pct", "effective_rank", "one_ulp_share"] as const)
      expect(COLOUR_SCALES[key].range).toEqual([0, 100]);
    expect(scaleTitle(COLOUR_SCALES.changed_share)).toBe("changed<br>% of weights (sequential)");
    expect(COLOUR_SCALES.enrichment.kind).toBe("diverging");
    expect(formatScaled(COLOUR_SCALES.effective_rank, 0.5)).toBe("50.0%");
    expect(formatScaled(COLOUR_SCALES.enrichment, 1.234)).toBe("1.23");
  });
});

describe("matrix view figures", () => {
  it("the update map's axes are the matrix's own row and column indices", () => {
    const map = {
      tau: 1e-5,
      grid_rows: 2,
      grid_cols: 3,
      cells: [0, 0.5, 1, 0.25, 0, 0],
      row_frac: [],
      col_frac: [],
      head_frac: null,
    };
    const f = updateMapFigure(map, [4, 96]);
    expect(f.data[0].y).toEqual([0, 2, 4]);
    expect(f.data[0].x).toEqual([0, 32, 64, 96]);
    expect(f.data[0].z[0]).toEqual([0, 50, 100]);
    expect(f.data[0].hovertext[1][0]).toBe("rows 2–3, columns 0–31: 25.0% changed");
    expect(heatmapCsv(f.data[0])[0]).toEqual(["", "columns 0–31", "columns 32–63", "columns 64–95"]);
    expect(binBounds(10, 4)).toEqual([0, 2, 5, 7, 10]);
  });
  it("profiles: binned x at each bin's first index, heads on integer ticks", () => {
    expect(profileFigure([0.1, 0.2], "row", 10).data[0].x).toEqual([0, 5]);
    expect(profileFigure([0.1, 0.2, 0.3], "head").layout.xaxis.dtick).toBe(1);
  });
});

describe("CSV", () => {
  it("quotes fields and keeps names from running as formulas", () => {
    expect(toCsv([["a,b", 'say "x"', null, 1.5, "=SUM(A1)", -2]])).toBe(
      '"a,b","say ""x""",,1.5,\'=SUM(A1),-2\r\n',
    );
    // a table's text that is a number stays a number; text that only starts like one is defused
    expect(toCsv([["-3.2", "+1.5e-5", "-12.5%", "-1,234", "-2+3", "@x"]])).toBe(
      "-3.2,+1.5e-5,-12.5%,\"-1,234\",'-2+3,'@x\r\n",
    );
  });
  it("a heatmap's grid with its labels, names unescaped", () => {
    const trace = { x: ["q", "a&lt;b"], y: ["layer 0"], z: [[-1, 0]], customdata: [[10, 100]] };
    expect(heatmapCsv(trace)).toEqual([
      ["", "q", "a<b"],
      ["layer 0", 10, 100],
    ]);
    expect(fromPlotlyText("&amp;lt;")).toBe("&lt;");
  });
});

describe("tensor table", () => {
  type R = { name: string; v: number | null };
  const rows: R[] = [
    { name: "b.q_proj", v: 2 },
    { name: "a.k_proj", v: null },
    { name: "c.q_proj", v: 1 },
  ];
  const columns: Column<R>[] = [
    { key: "name", label: "name", value: (r) => r.name },
    { key: "v", label: "v", value: (r) => r.v },
  ];
  it("sorts either way with missing values last", () => {
    expect(sortRows(rows, "v", columns).map((r) => r.v)).toEqual([1, 2, null]);
    expect(sortRows(rows, "-v", columns).map((r) => r.v)).toEqual([2, 1, null]);
    expect(sortRows(rows, "name", columns).map((r) => r.name)).toEqual(["a.k_proj", "b.q_proj", "c.q_proj"]);
    expect(sortRows(rows, "nope", columns)).toBe(rows);
  });
  it("filters on every term", () => {
    expect(filterRows(rows, "Q_PROJ c", (r) => r.name).map((r) => r.name)).toEqual(["c.q_proj"]);
    expect(filterRows(rows, "  ", (r) => r.name)).toBe(rows);
  });
});

describe("names", () => {
  it("sibling labels are unique", () => {
    expect(
      uniqueLabels([
        "m.layers.0.experts.0.w1.weight",
        "m.layers.0.experts.1.w1.weight",
        "m.layers.0.self_attn.q_proj.weight",
        "m.layers.0.self_attn.q_proj.bias",
        "m.layers.0.attn.c_attn.weight[q]",
      ]),
    ).toEqual(["experts.0.w1", "experts.1.w1", "q_proj", "q_proj.bias", "c_attn[q]"]);
  });
  it("neighbours are the same matrix one layer away, never the same layer", () => {
    const all = [0, 1, 2].flatMap((l) => [
      { name: `m.layers.${l}.input_layernorm.weight`, layer: l },
      { name: `m.layers.${l}.post_attention_layernorm.weight`, layer: l },
    ]);
    const n = layerNeighbours(all, all[0]);
    expect([n.prev, n.next?.name, n.inLayers]).toEqual([
      undefined,
      "m.layers.1.input_layernorm.weight",
      true,
    ]);
    expect(layerNeighbours(all, all[5]).next).toBeUndefined(); // the last layer
    expect(layerNeighbours(all, { name: "m.norm.weight", layer: null }).inLayers).toBe(false);
  });
});

describe("overview URL", () => {
  it("the tensor table's sort and filter round-trip; a bad sort key is dropped", () => {
    const s = parse("/analyses/abcdef12", "?sort=-sparsity&q=layers.3+q_proj&tau=0.001");
    expect([s.sort, s.filter, s.tau]).toEqual(["-sparsity", "layers.3 q_proj", 0.001]);
    expect(format(s)).toBe("/analyses/abcdef12?q=layers.3+q_proj&sort=-sparsity&tau=0.001");
    expect(parse("/analyses/abcdef12", "?sort=%3Cx%3E").sort).toBe("");
  });
});
