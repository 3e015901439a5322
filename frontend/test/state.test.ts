import { describe, expect, it } from "vitest";
import { DEFAULTS, format, parse, type ViewState } from "../src/state";

const id = "0123456789ab";
const states: ViewState[] = [
  { ...DEFAULTS },
  { ...DEFAULTS, filter: "llama dpo" },
  { ...DEFAULTS, view: "new" },
  { ...DEFAULTS, view: "overview", analysis: id },
  {
    ...DEFAULTS,
    view: "overview",
    analysis: id,
    metric: "rank_pct",
    tau: 1.0013580322265625e-4,
    mode: "rel",
    scale: "log",
  },
  { ...DEFAULTS, view: "tensor", analysis: id, tensor: "model.layers.3.self_attn.q_proj.weight", tau: 0 },
  { ...DEFAULTS, view: "tensor", analysis: id, tensor: "transformer.h.0.attn.c_attn.weight[q]", mode: "rel" },
  { ...DEFAULTS, view: "series", analysis: id },
  { ...DEFAULTS, view: "overlap", analysis: id },
  { ...DEFAULTS, view: "compare", ids: [id, "abcdefabcdef"], tau: 3e-4 },
];

function roundTrip(s: ViewState): ViewState {
  const url = new URL(format(s), "http://x");
  return parse(url.pathname, url.search);
}

describe("URL state codec", () => {
  it.each(states.map((s) => [format(s), s]))("round-trips %s", (_, s) => {
    expect(roundTrip(s as ViewState)).toEqual(s);
  });

  it("omits defaults from the URL", () => {
    expect(format({ ...DEFAULTS, view: "overview", analysis: id })).toBe(`/analyses/${id}`);
    expect(format(DEFAULTS)).toBe("/");
  });

  it("falls back to defaults for invalid values", () => {
    const s = parse(`/analyses/${id}`, "?metric=bogus&tau=-3&mode=sideways&scale=cubic");
    expect(s).toEqual({ ...DEFAULTS, view: "overview", analysis: id });
    expect(parse(`/analyses/${id}`, "?tau=NaN").tau).toBe(DEFAULTS.tau);
    expect(parse(`/analyses/${id}`, "?tau=1e9").tau).toBe(DEFAULTS.tau);
    expect(parse(`/analyses/${id}`, "?tau=").tau).toBe(DEFAULTS.tau);
  });

  it("never trusts the path", () => {
    expect(parse("/analyses/<script>", "").view).toBe("browse");
    expect(parse("/analyses/../../etc", "").view).toBe("browse");
    expect(parse(`/analyses/${id}/tensor`, "").view).toBe("overview"); // no tensor name
    expect(parse(`/analyses/${id}/nonsense`, "").view).toBe("overview");
    expect(parse("/compare", "?ids=zz,0123456789ab,../x").ids).toEqual([id]);
    expect(parse("/somewhere/else", "").view).toBe("browse");
  });

  it("keeps tensor names with any characters", () => {
    const s = { ...DEFAULTS, view: "tensor" as const, analysis: id, tensor: "a b/c?d=e&f[g]#h" };
    expect(roundTrip(s)).toEqual(s);
  });
});
