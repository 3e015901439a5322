// A training series: consistent / transient / untouched shares, the transient fraction over
// training, what each checkpoint moved against the final mask, per-layer lines, and a τ control
// (a series is computed at one τ: the control lists this series' siblings, the same checkpoints at
// other τ, and starts one at a new τ).
import { get, post, type AnalysisOut, type Created, type Series, type SeriesResult } from "../api";
import type { Context } from "../context";
import { card, h, panel } from "../dom";
import { pct, tauText } from "../format";
import {
  caption,
  firstChangeFigure,
  layerSteps,
  layerTransientFigure,
  normFigure,
  splitFigure,
  transientFigure,
  transientHeatmapFigure,
} from "../maskcharts";
import { layerLabel } from "../charts";
import { plotInto } from "../plot";
import { withState } from "../state";
import { toast } from "../toast";
import { finishedAnalysis } from "./analysis";

const lastName = (path: string) => path.split("/").filter(Boolean).pop() ?? path;

export async function renderSeries(ctx: Context): Promise<void> {
  const job = await finishedAnalysis(ctx);
  if (!job) return;
  const { root, state } = ctx;
  const [series, analyses] = await Promise.all([
    get<Series>(`/api/analyses/${state.analysis}/series`),
    get<AnalysisOut[]>("/api/analyses"),
  ]);
  if (!ctx.alive()) return;
  const c = series.categories;
  const final = series.checkpoints[series.checkpoints.length - 1];
  root.replaceChildren(
    h("h1", { id: "series-title" }, `Training series: ${lastName(series.base)} → ${lastName(final)}`),
    h(
      "p",
      { class: "muted" },
      `base ${series.base} · ${series.steps.length} checkpoints, final ${final} · τ = ${tauText(series.tau)} · ` +
        "masks M_t = changed(θ_t vs base); transient = moved at some step but not in the final mask",
    ),
    tauControl(ctx, job, analyses, series.tau),
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
  a.id = "transient-fraction";
  const b = panel(row, "What each checkpoint moved, against the final mask");
  root.append(row);
  plotInto(a, transientFigure(series.steps), "transient fraction per checkpoint");
  plotInto(b, splitFigure(series.steps, series.numel), "share of weights per category");
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

  const tensors = (await get<SeriesResult>(`/api/analyses/${state.analysis}/result`)).tensors;
  if (!ctx.alive()) return;
  const perLayer = panel(root, "Transient fraction per layer over training");
  perLayer.id = "layer-lines";
  plotInto(
    perLayer,
    layerTransientFigure(series.checkpoints, tensors),
    "transient fraction per layer and checkpoint",
  );
  perLayer.append(
    caption(
      "One line per layer: of the weights it moved at each checkpoint, the share not in the final mask.",
    ),
  );
  root.append(h("section", { class: "panel" }, layerTable(tensors)));
}

/** τ of this series and of its siblings (same checkpoints and mode, done), and a field to start one. */
function tauControl(ctx: Context, job: AnalysisOut, analyses: AnalysisOut[], tau: number): HTMLElement {
  const same = (a: AnalysisOut) =>
    a.kind === "series" &&
    a.status === "done" &&
    a.relative === job.relative &&
    a.checkpoints.join() === job.checkpoints.join();
  const siblings = analyses.filter(same).sort((x, y) => x.taus[0] - y.taus[0]);
  const field = h("input", {
    id: "series-tau",
    type: "text",
    size: 10,
    value: tauText(tau),
    "aria-label": "new τ",
  });
  const start = async () => {
    const taus = [Number(field.value)];
    if (!(taus[0] > 0)) return toast("τ must be a positive number");
    const body = { kind: "series", checkpoints: job.checkpoints, taus, relative: job.relative };
    try {
      const { id } = await post<Created>("/api/analyses", body);
      ctx.navigate(withState(ctx.state, { analysis: id }));
    } catch (e) {
      toast((e as Error).message);
    }
  };
  return h(
    "div",
    { class: "controls" },
    h(
      "div",
      { class: "chips", role: "group", "aria-label": "τ of this series", id: "series-taus" },
      "τ:",
      ...siblings.map((a) =>
        h(
          "button",
          {
            type: "button",
            "aria-pressed": String(a.id === job.id),
            "data-tau": a.taus[0],
            onclick: () => ctx.navigate(withState(ctx.state, { analysis: a.id })),
          },
          tauText(a.taus[0]),
        ),
      ),
    ),
    h(
      "label",
      {},
      "run at τ",
      field,
      h("button", { type: "button", id: "series-run", onclick: start }, "Run"),
    ),
  );
}

/** Per layer: the share of its weights consistent and transient at the end. */
function layerTable(tensors: SeriesResult["tensors"]): HTMLElement {
  const numel = new Map<number | null, number[]>();
  for (const t of tensors) {
    const l = numel.get(t.layer ?? null) ?? [0, 0, 0];
    numel.set(t.layer ?? null, [
      l[0] + t.numel,
      l[1] + t.categories.consistent,
      l[2] + t.categories.transient,
    ]);
  }
  const cell = (text: string) => h("td", { class: "num" }, text);
  return h(
    "details",
    {},
    h("summary", {}, "Per-layer split at the final checkpoint"),
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
        ...layerSteps(tensors).map(({ layer }) => {
          const [n, consistent, transient] = numel.get(layer)!;
          return h(
            "tr",
            {},
            h("td", {}, layerLabel(layer)),
            cell(pct(consistent / n)),
            cell(pct(transient / n)),
          );
        }),
      ),
    ),
  );
}
