// One matrix in detail: update map, row / column / head profiles, |Δ| histogram with τ marked,
// singular spectrum with rank and energy ranks; neighbours one click away.
import { get, type TensorDetail, type TensorRow } from "../api";
import { histogramFigure, layerLabel, profileFigure, spectrumFigure, updateMapFigure } from "../charts";
import type { Context } from "../context";
import { card, h, panel } from "../dom";
import { int, pct, sci, tauText } from "../format";
import { plotInto } from "../plot";
import { withState } from "../state";
import { geometryFigures } from "./geometry";
import { floorCaption, precisionFigures, withVisibilityFloor } from "./precision";

export async function renderTensor(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const id = state.analysis!;
  const [t, all] = await Promise.all([
    get<TensorDetail>(
      `/api/analyses/${id}/tensors/${state.tensor!.split("/").map(encodeURIComponent).join("/")}`,
    ),
    get<TensorRow[]>(`/api/analyses/${id}/tensors`),
  ]);
  if (!ctx.alive()) return;
  const go = (name: string) => ctx.navigate(withState(state, { tensor: name }));
  const sameMatrix = all
    .filter((r) => r.matrix === t.matrix && r.layer !== null)
    .sort((a, b) => a.layer! - b.layer!);
  const at = sameMatrix.findIndex((r) => r.name === t.name);
  const neighbour = (row: TensorRow | undefined, label: string, key: string) =>
    h(
      "button",
      { type: "button", disabled: !row, "data-nav": key, onclick: () => row && go(row.name) },
      label,
    );
  const siblings = all.filter((r) => r.layer === t.layer && r.name !== t.name);
  const counts = t.histograms[state.mode] ?? t.histograms.abs ?? [];
  const edges = t.bin_edges;
  root.replaceChildren(
    h("p", {}, h("a", { href: `/analyses/${id}`, "data-link": true }, "← overview")),
    h("h1", { id: "tensor-name" }, t.name),
    h(
      "p",
      { class: "muted" },
      `${layerLabel(t.layer)} · ${t.block} · ${t.matrix} · shape ${t.shape.join(" × ")} · ${int(t.numel)} weights`,
    ),
    h(
      "div",
      { class: "controls" },
      neighbour(
        sameMatrix[at - 1],
        sameMatrix[at - 1] ? `← ${layerLabel(sameMatrix[at - 1].layer)}` : "← first layer",
        "prev",
      ),
      neighbour(
        sameMatrix[at + 1],
        sameMatrix[at + 1] ? `${layerLabel(sameMatrix[at + 1].layer)} →` : "last layer →",
        "next",
      ),
      h("span", { class: "muted" }, "same layer:"),
      ...siblings.map((r) =>
        h("button", { type: "button", onclick: () => go(r.name), title: r.name }, shortLabel(r.name)),
      ),
    ),
    h(
      "div",
      { class: "cards" },
      card("rank of ΔW", t.rank === null ? "–" : `${t.rank} / ${t.full_rank}`),
      card("rank % of full", t.rank_pct === null ? "–" : `${t.rank_pct.toFixed(1)}%`),
      card("effective rank", t.effective_rank === null ? "–" : t.effective_rank.toFixed(1)),
      card("‖Δ‖ / ‖W‖", sci((t.norm_delta ?? 0) / (t.norm_base || 1))),
      card("bit-identical weights", pct(counts.length ? counts[0] / t.numel : null)),
    ),
  );
  const grid = h("div", { class: "grid2" });
  root.append(grid);
  if (t.update_map) {
    plotInto(
      panel(grid, `Update map at τ = ${tauText(t.update_map.tau)} (share changed per cell)`),
      updateMapFigure(t.update_map),
      "update map",
    );
    const profiles = panel(grid, "Profiles");
    plotInto(profiles, profileFigure(t.update_map.row_frac, "row"), "changed share per row");
    plotInto(profiles, profileFigure(t.update_map.col_frac, "column"), "changed share per column");
    if (t.update_map.head_frac)
      plotInto(profiles, profileFigure(t.update_map.head_frac, "head"), "changed share per head");
  }
  const floor = state.mode === "rel" ? t.ulp_histogram?.visibility_floor : undefined;
  const dtype = t.ulp_histogram?.dtype ?? t.dtype;
  if (counts.length) {
    const histPanel = panel(grid, "Histogram of |Δ|" + (state.mode === "rel" ? "/|W|" : ""));
    plotInto(
      histPanel,
      withVisibilityFloor(
        histogramFigure(counts, edges, state.tau, state.mode === "rel" ? "|Δ|/|W|" : "|Δ|"),
        floor,
        dtype,
      ),
      "histogram of weight changes",
    );
    if (floor) histPanel.append(floorCaption(floor, dtype));
  }
  if (t.spectrum) plotInto(panel(grid, "Singular spectrum of ΔW"), spectrumFigure(t), "singular values");
  precisionFigures(grid, t);
  geometryFigures(grid, t.geometry);
}

/** "model.layers.3.self_attn.q_proj.weight" -> "q_proj"; fused parts keep their [q]. */
function shortLabel(name: string): string {
  const parts = name
    .replace(/\.(weight|bias)(\[\w+\])?$/, (_, kind, part) => (kind === "bias" ? ".bias" : "") + (part ?? ""))
    .split(".");
  return parts.slice(-(parts[parts.length - 1] === "bias" ? 2 : 1)).join(".");
}
