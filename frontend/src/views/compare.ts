// Compare: several pair analyses side by side per layer (e.g. base→SFT vs SFT→RL).
import { get, type AnalysisStatus, type Checkpoint } from "../api";
import { compareFigure } from "../charts";
import { h, pct } from "../dom";
import type { Context } from "../main";
import { withState } from "../state";
import { plotInto } from "./plot";

export async function renderCompare(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const [analyses, checkpoints] = await Promise.all([get<AnalysisStatus[]>("/api/analyses"), get<Checkpoint[]>("/api/checkpoints")]);
  if (!ctx.alive()) return;
  const names = new Map(checkpoints.map((c) => [c.id, c.name]));
  const pairs = analyses.filter((a) => a.kind === "pair" && a.status === "done");
  const label = (a: AnalysisStatus) => a.checkpoints.map((c) => names.get(c) ?? c).join(" → ");
  const chips = h("div", { class: "chips", role: "group", "aria-label": "analyses to compare" }, ...pairs.map((a) => h("button", {
    type: "button", "aria-pressed": String(state.ids.includes(a.id)),
    onclick: () => ctx.navigate(withState(state, { ids: state.ids.includes(a.id) ? state.ids.filter((x) => x !== a.id) : [...state.ids, a.id] })),
  }, label(a))));
  root.replaceChildren(h("h1", {}, "Compare analyses"), h("p", { class: "muted" }, "Pick pair analyses, e.g. base → SFT and SFT → RL."), chips);
  if (!state.ids.length) return;
  const cmp = await get<any>(`/api/compare?ids=${state.ids.join(",")}&tau=${state.tau}&mode=${state.mode}`);
  if (!ctx.alive()) return;
  const byId = new Map(pairs.map((a) => [a.id, label(a)]));
  root.append(h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "analysis"), h("th", { class: "num" }, `sparsity at τ=${cmp.tau.toExponential(2)}`))),
    h("tbody", {}, ...cmp.analyses.map((a: any) => h("tr", {}, h("td", {}, byId.get(a.analysis) ?? a.analysis), h("td", { class: "num" }, pct(a.sparsity)))))));
  const panel = h("section", { class: "panel" }, h("h2", {}, "Sparsity per layer"));
  root.append(panel);
  plotInto(panel, compareFigure(cmp.analyses.map((a: any) => ({ ...a, label: byId.get(a.analysis) ?? a.analysis }))), "sparsity per layer, per analysis");
}
