// A training series: consistent / transient / untouched shares, the transient fraction over
// training, what each checkpoint moved against the final mask, and a per-layer split.
import { get, type Series, type SeriesResult } from "../api";
import { layerLabel, seriesFigures } from "../charts";
import type { Context } from "../context";
import { card, h, panel } from "../dom";
import { pct, sci } from "../format";
import { caption, firstChangeFigure, normFigure, transientHeatmapFigure } from "../maskcharts";
import { plotInto } from "../plot";
import { finishedAnalysis } from "./analysis";

export async function renderSeries(ctx: Context): Promise<void> {
  if (!(await finishedAnalysis(ctx))) return;
  const { root, state } = ctx;
  const series = await get<Series>(`/api/analyses/${state.analysis}/series`);
  if (!ctx.alive()) return;
  const [curves, split] = seriesFigures(series.steps, series.numel);
  const c = series.categories;
  root.replaceChildren(
    h("h1", {}, `Training series · ${series.steps.length} checkpoints`),
    h(
      "p",
      { class: "muted" },
      `τ = ${sci(series.tau)} · masks M_t = changed(θ_t vs base); transient = moved at some step but not in the final mask`,
    ),
    h(
      "div",
      { class: "cards" },
      card("consistent (in the final mask)", pct(c.consistent / series.numel), "consistent"),
      card("transient (moved, then reverted)", pct(c.transient / series.numel), "transient"),
      card("never moved", pct(c.untouched / series.numel), "untouched"),
    ),
  );
  const row = h("div", { class: "grid2" });
  const a = panel(row, "Transient fraction over training");
  const b = panel(row, "What each checkpoint moved, against the final mask");
  root.append(row);
  plotInto(a, curves, "transient fraction per checkpoint");
  plotInto(b, split, "share of weights per category");
  a.append(
    caption("Per checkpoint, the share of its changed weights that are not changed at the final checkpoint."),
  );
  b.append(
    caption(
      "Per checkpoint, all weights split into changed and in the final mask, changed but not, and unchanged.",
    ),
  );
  const row2 = h("div", { class: "grid2" });
  const first = panel(row2, "First change: where each weight first moved");
  first.id = "first-change";
  const norm = panel(row2, "‖Δ‖ per checkpoint");
  norm.id = "norm-delta";
  root.append(row2);
  plotInto(first, firstChangeFigure(series.steps), "weights first changed per checkpoint, kept or reverted");
  first.append(
    caption(
      "Weights counted at the checkpoint where they first differ from the base (at τ), split by whether they still differ at the final one.",
    ),
  );
  plotInto(norm, normFigure(series.steps), "Frobenius norm of the change per checkpoint");
  norm.append(
    caption(
      "The Frobenius norm ‖θ_t − θ₀‖₂ of the change over all compared weights (hover: relative to ‖θ₀‖₂).",
    ),
  );
  const heat = panel(root, "Transient share per layer × matrix type");
  heat.id = "transient-heatmap";
  plotInto(
    heat,
    transientHeatmapFigure(series.transient_heatmap),
    "transient share per layer and matrix type",
  );
  heat.append(
    caption(
      "Per layer and matrix type, the share of weights that moved at some checkpoint but not at the final one.",
    ),
  );

  const layers = new Map<string, { numel: number; consistent: number; transient: number }>();
  for (const t of (await get<SeriesResult>(`/api/analyses/${state.analysis}/result`)).tensors) {
    const key = layerLabel(t.layer);
    const l = layers.get(key) ?? { numel: 0, consistent: 0, transient: 0 };
    l.numel += t.numel;
    l.consistent += t.categories.consistent;
    l.transient += t.categories.transient;
    layers.set(key, l);
  }
  const details = h(
    "details",
    {},
    h("summary", {}, "Per-layer split"),
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "layer"),
          h("th", { class: "num" }, "consistent"),
          h("th", { class: "num" }, "transient"),
        ),
      ),
      h(
        "tbody",
        {},
        ...[...layers].map(([k, v]) =>
          h(
            "tr",
            {},
            h("td", {}, k),
            h("td", { class: "num" }, pct(v.consistent / v.numel)),
            h("td", { class: "num" }, pct(v.transient / v.numel)),
          ),
        ),
      ),
    ),
  );
  root.append(h("section", { class: "panel" }, details));
}
