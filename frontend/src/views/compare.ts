// Compare: several pair analyses side by side per layer (e.g. base→SFT vs SFT→RL).
import { get, type AnalysisOut, type Checkpoint, type Comparison } from "../api";
import { compareFigure } from "../charts";
import type { Context } from "../context";
import { h, panel } from "../dom";
import { pct, tauText } from "../format";
import { plotInto } from "../plot";
import { withState } from "../state";

export async function renderCompare(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const [analyses, checkpoints] = await Promise.all([
    get<AnalysisOut[]>("/api/analyses"),
    get<Checkpoint[]>("/api/checkpoints"),
  ]);
  if (!ctx.alive()) return;
  const names = new Map(checkpoints.map((c) => [c.id, c.name]));
  const pairs = analyses.filter((a) => a.kind === "pair" && a.status === "done");
  const label = (a: AnalysisOut) => a.checkpoints.map((c) => names.get(c) ?? c).join(" → ");
  const chips = h(
    "div",
    { class: "chips", role: "group", "aria-label": "analyses to compare" },
    ...pairs.map((a) =>
      h(
        "button",
        {
          type: "button",
          "aria-pressed": String(state.ids.includes(a.id)),
          onclick: () =>
            ctx.navigate(
              withState(state, {
                ids: state.ids.includes(a.id) ? state.ids.filter((x) => x !== a.id) : [...state.ids, a.id],
              }),
            ),
        },
        label(a),
      ),
    ),
  );
  root.replaceChildren(
    h("h1", {}, "Compare analyses"),
    h("p", { class: "muted" }, "Pick pair analyses, e.g. base → SFT and SFT → RL."),
    chips,
  );
  if (!state.ids.length) return;
  const cmp = await get<Comparison>(
    `/api/compare?ids=${state.ids.join(",")}&tau=${state.tau}&mode=${state.mode}`,
  );
  if (!ctx.alive()) return;
  const byId = new Map(pairs.map((a) => [a.id, label(a)]));
  root.append(
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h("tr", {}, h("th", {}, "analysis"), h("th", { class: "num" }, `sparsity at τ=${tauText(cmp.tau)}`)),
      ),
      h(
        "tbody",
        {},
        ...cmp.analyses.map((a) =>
          h(
            "tr",
            {},
            h("td", {}, byId.get(a.analysis) ?? a.analysis),
            h("td", { class: "num" }, pct(a.sparsity)),
          ),
        ),
      ),
    ),
  );
  plotInto(
    panel(root, "Sparsity per layer"),
    compareFigure(cmp.analyses.map((a) => ({ ...a, label: byId.get(a.analysis) ?? a.analysis }))),
    "sparsity per layer, per analysis",
  );
}
