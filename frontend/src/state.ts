// The whole view state lives in the URL (path + query): reloading or sharing a link restores it.
// parse() never throws: anything invalid falls back to the default.

export const METRICS = [
  "sparsity",
  "changed_share",
  "rank_pct",
  "effective_rank",
  "relative_change",
  "mean_abs_delta",
  "one_ulp_share",
] as const;
export type Metric = (typeof METRICS)[number];
export type View = "browse" | "new" | "overview" | "tensor" | "series" | "overlap" | "compare";
export type Mode = "abs" | "rel";
export type Scale = "linear" | "log";

export interface ViewState {
  view: View;
  analysis: string | null; // analysis id (overview, tensor, series, overlap)
  tensor: string | null; // tensor view: full matrix name
  metric: Metric;
  tau: number; // τ; the dashboard snaps it to a histogram edge
  mode: Mode;
  scale: Scale;
  ids: string[]; // compare: analysis ids
  filter: string; // browse: text filter; overview: the tensor table's filter
  sort: string; // overview: the tensor table's order, a column key ("-key": descending); "" none
}

export const DEFAULTS: ViewState = {
  view: "browse",
  analysis: null,
  tensor: null,
  metric: "sparsity",
  tau: 1e-5,
  mode: "abs",
  scale: "linear",
  ids: [],
  filter: "",
  sort: "",
};

const ID = /^[0-9a-f]{6,32}$/;
const SORT = /^-?[a-z0-9_]{1,32}$/;

function oneOf<T extends string>(value: string | null, allowed: readonly T[], fallback: T): T {
  return value !== null && (allowed as readonly string[]).includes(value) ? (value as T) : fallback;
}

function tauOf(value: string | null): number {
  if (value === null || value.trim() === "") return DEFAULTS.tau;
  const n = Number(value);
  return Number.isFinite(n) && n >= 0 && n <= 1e3 ? n : DEFAULTS.tau;
}

export function parse(pathname: string, search: string): ViewState {
  const q = new URLSearchParams(search);
  const common = {
    ...DEFAULTS,
    metric: oneOf(q.get("metric"), METRICS, DEFAULTS.metric),
    tau: tauOf(q.get("tau")),
    mode: oneOf(q.get("mode"), ["abs", "rel"] as const, DEFAULTS.mode),
    scale: oneOf(q.get("scale"), ["linear", "log"] as const, DEFAULTS.scale),
  };
  const parts = pathname.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "new" && parts.length === 1) return { ...common, view: "new" };
  if (parts[0] === "compare" && parts.length === 1) {
    const ids = (q.get("ids") ?? "").split(",").filter((id) => ID.test(id));
    return { ...common, view: "compare", ids };
  }
  if (parts[0] === "analyses" && parts[1] && ID.test(parts[1])) {
    const analysis = parts[1];
    const sub = parts[2] ?? "";
    if (parts.length === 2) {
      const sort = q.get("sort") ?? "";
      const table = { filter: (q.get("q") ?? "").slice(0, 200), sort: SORT.test(sort) ? sort : "" };
      return { ...common, view: "overview", analysis, ...table };
    }
    if (sub === "tensor" && parts.length === 3) {
      const tensor = q.get("name");
      return tensor
        ? { ...common, view: "tensor", analysis, tensor }
        : { ...common, view: "overview", analysis };
    }
    if ((sub === "series" || sub === "overlap") && parts.length === 3)
      return { ...common, view: sub, analysis };
    return { ...common, view: "overview", analysis };
  }
  return { ...common, view: "browse", filter: (q.get("q") ?? "").slice(0, 200) };
}

export function format(s: ViewState): string {
  const q = new URLSearchParams();
  let path = "/";
  const a = s.analysis ? encodeURIComponent(s.analysis) : "";
  switch (s.view) {
    case "new":
      path = "/new";
      break;
    case "compare":
      path = "/compare";
      if (s.ids.length) q.set("ids", s.ids.join(","));
      break;
    case "overview":
      path = `/analyses/${a}`;
      if (s.filter) q.set("q", s.filter);
      if (s.sort) q.set("sort", s.sort);
      break;
    case "tensor":
      path = `/analyses/${a}/tensor`;
      if (s.tensor) q.set("name", s.tensor);
      break;
    case "series":
      path = `/analyses/${a}/series`;
      break;
    case "overlap":
      path = `/analyses/${a}/overlap`;
      break;
    default:
      if (s.filter) q.set("q", s.filter);
  }
  if (["overview", "tensor", "compare"].includes(s.view)) {
    if (s.metric !== DEFAULTS.metric && s.view !== "tensor") q.set("metric", s.metric);
    if (s.tau !== DEFAULTS.tau) q.set("tau", String(s.tau));
    if (s.mode !== DEFAULTS.mode) q.set("mode", s.mode);
    if (s.scale !== DEFAULTS.scale && s.view === "overview") q.set("scale", s.scale);
  }
  const query = q.toString();
  return query ? `${path}?${query}` : path;
}

export function withState(s: ViewState, change: Partial<ViewState>): ViewState {
  return { ...s, ...change };
}
